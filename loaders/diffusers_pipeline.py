"""diffusers: ``pipe.load_loha()`` / ``load_lokr()`` / ``load_lycoris()`` on any SD1.x/SDXL pipeline.

``lohakr.enable(pipe)`` binds the methods of ``LycorisLoaderMixin`` to an existing pipeline
instance (no subclassing; the pipeline's class and config are untouched). The work is done by
the shared loader (parse → resolve → ``WeightPatcher``); this module only finds the components,
turns the user's strength arguments into per-component multipliers, and reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .adapter import KIND_NAMES, Adapter, load_adapter
from .blocks import BlockWeights, parse_block_weights
from .errors import LohakrError
from .families import FAMILIES, family_of
from .guard import check_strength
from .names import ModelLayout
from .patcher import PatchedAdapter, WeightPatcher
from .plan import log_report, plan_load
from .report import LoadReport
from .sources import SourceIndex

logger = logging.getLogger("lohakr")

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
Strength = float | Mapping[str, float]


class LycorisLoaderMixin:
    """LoHa/LoKr/LyCORIS loading for diffusers pipelines (``unet``, ``text_encoder[_2]``)."""

    # -- loading --------------------------------------------------------------------------------
    def load_lycoris(
        self,
        path_or_dict: str | os.PathLike | Mapping[str, Any] | Adapter,
        adapter_name: str | None = None,
        *,
        strength: Strength = 1.0,
        text_encoder_strength: float | None = None,
        block_weights: str | Mapping[str, float] | BlockWeights | None = None,
        strict: bool = False,
        allow_base_mismatch: bool = False,
    ) -> LoadReport:
        """Load a LyCORIS adapter (LoHa, LoKr, or a mix with LoRA/full modules) and patch the
        pipeline's weights. Returns the report; nothing is changed if it raises.

        ``strength`` is a number, or a dict per component (``{"unet": 0.8, "text_encoder": 0.5,
        "text_encoder_2": 0.0}``; components not named get 1). ``text_encoder_strength`` overrides
        the text encoders. ``block_weights``: an A1111 vector, a preset or ``"IN04=0.5, OUT=0"``.
        ``strict=True`` raises if any module of the file would not be applied. A file for another
        base model (its header, key names or shapes say so) is refused unless
        ``allow_base_mismatch=True``; a file of which nothing applies is always refused.
        """
        return _load(self, path_or_dict, adapter_name, None, strength, text_encoder_strength, block_weights, strict,
                     allow_base_mismatch)

    def load_loha(self, path_or_dict, adapter_name=None, *, strength: Strength = 1.0,
                  text_encoder_strength: float | None = None, block_weights=None, strict: bool = False,
                  allow_base_mismatch: bool = False) -> LoadReport:
        """``load_lycoris`` for a LoHa file; refuses a file with no LoHa module."""
        return _load(self, path_or_dict, adapter_name, "loha", strength, text_encoder_strength, block_weights, strict,
                     allow_base_mismatch)

    def load_lokr(self, path_or_dict, adapter_name=None, *, strength: Strength = 1.0,
                  text_encoder_strength: float | None = None, block_weights=None, strict: bool = False,
                  allow_base_mismatch: bool = False) -> LoadReport:
        """``load_lycoris`` for a LoKr file; refuses a file with no LoKr module."""
        return _load(self, path_or_dict, adapter_name, "lokr", strength, text_encoder_strength, block_weights, strict,
                     allow_base_mismatch)

    # -- changing and removing ------------------------------------------------------------------
    def set_lycoris_strength(
        self,
        adapter_name: str,
        strength: Strength | None = None,
        *,
        text_encoder_strength: float | None = None,
        block_weights: str | Mapping[str, float] | BlockWeights | None = None,
    ) -> None:
        """Change an adapter's strengths or block weights, recomputing from the kept factors and
        originals (the file is not read again). Arguments left ``None`` keep their value.

        ``strength`` as a number sets every component (UNet and text encoders) to it; as a dict
        (``{"unet": 0.6}``) it changes only the components it names. ``text_encoder_strength`` sets
        both text encoders. Every component whose strength changes is logged (INFO)."""
        patcher = _patcher(self)
        adapter = _get(patcher, adapter_name)
        patcher.check_changeable(adapter_name, "change its strength")
        new_strength = new_weights = None
        if strength is not None or text_encoder_strength is not None:
            if strength is None or isinstance(strength, Mapping):
                named = component_strengths(strength or {}, text_encoder_strength, only_named=True)
                new_strength = {**adapter.component_strength, **named}
            else:
                new_strength = _present(self, component_strengths(strength, text_encoder_strength))
            changed = [f"{c} {adapter.component_strength.get(c, 1.0):g} → {v:g}" for c, v in new_strength.items()
                       if v != adapter.component_strength.get(c, 1.0)]
            if changed:
                logger.info("lohakr: %s: strength %s", adapter_name, ", ".join(changed))
        if block_weights is not None:
            new_weights = parse_block_weights(block_weights, adapter.report.blocks, adapter.report.model_family)
        patcher.update(adapter_name, _progress(self, f"lohakr: {adapter_name}", len(adapter.matches)),
                       component_strength=new_strength, block_weights=new_weights)
        adapter.report.strength = dict(adapter.component_strength)
        adapter.report.block_weights = adapter.block_weights.spec

    def unload_lycoris(self, adapter_name: str | None = None) -> None:
        """Remove one adapter (or all): every weight it touched is recomputed without it, and a
        weight no adapter touches any more gets its original back, bit for bit."""
        patcher = _patcher(self)
        names = [adapter_name] if adapter_name is not None else list(patcher.adapters)
        for name in names:
            _get(patcher, name)
            patcher.check_changeable(name, "unload it")
        for name in names:
            adapter = _get(patcher, name)
            patcher.remove(name, _progress(self, f"lohakr: unload {name}", len(adapter.matches)))
            logger.info("lohakr: unloaded %s", name)

    @contextlib.contextmanager
    def lycoris_batch(self) -> Iterator[None]:
        """Group loads, strength changes and unloads: each touched weight is recomputed once, when
        the block ends, so stacking k adapters costs k rebuilds per weight instead of k²/2::

            with pipe.lycoris_batch():
                pipe.load_loha("style.safetensors", strength=0.7)
                pipe.load_lokr("character.safetensors")

        Inside the block, files are parsed and matched (errors are raised at once, as usual) but
        weights change only at its end. The block is all or nothing: if anything in it raises, or
        the final pass fails, the weights and the loaded adapters (with their strengths) are exactly
        as before the block, and the error, which names the file, is raised."""
        with _patcher(self).batch(lambda total: _progress(self, "lohakr: batch", total)):
            yield

    def lycoris_adapters(self) -> list[LoadedAdapter]:
        """The loaded adapters, in brief (one line each when printed): name, algorithms, modules
        applied of the file's, strengths, block weights, fused; the full load report is ``.report``."""
        return [LoadedAdapter.of(a) for a in _patcher(self)]


@dataclass(frozen=True)
class LoadedAdapter:
    """One loaded adapter in brief. Fields read as attributes or as keys (``a["strength"]``)."""

    name: str
    algorithms: str
    applied: int
    modules: int
    strength: dict[str, float]
    block_weights: str
    fused: bool
    source: str
    report: LoadReport = field(repr=False, compare=False)

    @classmethod
    def of(cls, adapter: PatchedAdapter) -> LoadedAdapter:
        kinds = Counter(o.kind for o in adapter.report.applied)
        algorithms = " + ".join(f"{KIND_NAMES[k]}" for k, _ in kinds.most_common()) or "nothing"
        return cls(adapter.name, algorithms, len(adapter.matches), len(adapter.report.outcomes),
                   dict(adapter.component_strength), adapter.block_weights.spec, adapter.fused,
                   adapter.report.source, adapter.report)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __str__(self) -> str:
        strengths = ", ".join(f"{c} {v:g}" for c, v in self.strength.items())
        extra = (f"; block weights {self.block_weights}" if self.block_weights else "") + (
            "; fused" if self.fused else "")
        return f"{self.name}: {self.algorithms}, {self.applied}/{self.modules} modules applied; {strengths}{extra}"


def enable(pipe: Any, *, keep_originals_on: str | None = "auto", fuse: bool = False,
           source_files: str | os.PathLike | Iterable | Mapping | None = None) -> Any:
    """Give an existing pipeline instance the ``LycorisLoaderMixin`` methods; returns it.

    ``keep_originals_on``: where the original weights are kept for exact unloading. ``"auto"``
    (default): in the safetensors files the components were loaded from, where those are known
    and the weight still equals the file (patched in place, read back from the file on a strength
    change or unload: no second copy in memory); otherwise beside the weights when they are on the
    CPU or on a GPU with a safe margin of memory to spare (no copy at all), else on the CPU.
    ``"cpu"``: always in memory, on the CPU (no extra GPU memory); ``None``: always in memory beside
    the weights.

    ``source_files``: the files the pipeline was loaded from, when ``from_pretrained`` did not
    record them: the single-file checkpoint of ``from_single_file`` (original SGM keys), a folder,
    a list of files, or a dict per component (``{"unet": "unet.safetensors"}``). Found by
    themselves after ``from_pretrained`` from a local folder.

    ``fuse=True``: keep no originals; every load adds into the weights for good (no extra memory,
    fastest), and strengths can then not change nor adapters be unloaded (reload the model).
    Stacked fused adapters are rounded to the weight dtype after each load."""
    patcher = pipe.__dict__.get("_lohakr_patcher")
    if patcher is not None and (patcher.keep_originals_on, patcher.fuse) != (keep_originals_on, fuse):
        if patcher.adapters:
            raise LohakrError(
                f"enable() with other settings while adapters are loaded ({', '.join(patcher.adapters)}); "
                "unload them first (fused adapters: reload the pipeline)"
            )
        del pipe.__dict__["_lohakr_patcher"]
    pipe.__dict__["_lohakr_keep_originals_on"] = keep_originals_on
    pipe.__dict__["_lohakr_fuse"] = fuse
    pipe.__dict__["_lohakr_source_files"] = source_files
    for name in ("load_lycoris", "load_loha", "load_lokr", "set_lycoris_strength", "unload_lycoris",
                 "lycoris_batch", "lycoris_adapters"):
        setattr(pipe, name, types.MethodType(getattr(LycorisLoaderMixin, name), pipe))
    return pipe


def component_strengths(strength: Strength, text_encoder_strength: float | None,
                        only_named: bool = False) -> dict[str, float]:
    """Per-component multipliers from the user's ``strength`` / ``text_encoder_strength``; with
    ``only_named`` a dict gives just the components it names (others are not filled with 1)."""
    if isinstance(strength, Mapping):
        unknown = set(strength) - set(COMPONENTS)
        if unknown:
            raise LohakrError(
                f"unknown component(s) {', '.join(sorted(unknown))} in strength; use {', '.join(COMPONENTS)}"
            )
        result = {c: check_strength(strength.get(c, 1.0), f"strength[{c!r}]") for c in COMPONENTS
                  if not only_named or c in strength}
    else:
        result = {c: check_strength(strength) for c in COMPONENTS}
    if text_encoder_strength is not None:
        value = check_strength(text_encoder_strength, "text_encoder_strength")
        result.update({c: value for c in TEXT_ENCODERS})
    return result


def pipeline_layout(pipe: Any) -> ModelLayout:
    """The layout of the pipeline's denoiser (UNet, or a transformer of ``families.py``) and its
    text encoders, from the live modules."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        family = family_of(transformer)
        if family is None:
            known = ", ".join(f"{f.name} ({', '.join(f.classes)})" for f in FAMILIES.values())
            raise LohakrError(f"this pipeline's transformer is a {type(transformer).__name__}, which lohakr has no "
                              f"layout for; it knows {known}, and SD1.x/SD2.x/SDXL UNets")
        encoders = {c: getattr(pipe, c, None) for c in TEXT_ENCODERS}
        return ModelLayout.from_transformer(transformer, family, encoders)
    parts = {c: getattr(pipe, c, None) for c in ("unet", "text_encoder", "text_encoder_2")}
    if parts["unet"] is None and parts["text_encoder"] is None:
        raise LohakrError("this pipeline has no unet, transformer or text_encoder to patch")
    return ModelLayout.from_diffusers(**parts)


# -- internals ------------------------------------------------------------------------------------
def _patcher(pipe: Any) -> WeightPatcher:
    patcher = pipe.__dict__.get("_lohakr_patcher")
    if patcher is None:
        patcher = WeightPatcher(pipe.__dict__.get("_lohakr_keep_originals_on", "auto"),
                                fuse=pipe.__dict__.get("_lohakr_fuse", False))
        pipe.__dict__["_lohakr_patcher"] = patcher
    return patcher


def _sources(pipe: Any, patcher: WeightPatcher) -> SourceIndex | None:
    """The files the pipeline's components came from, where originals may stay (``"auto"`` only)."""
    if patcher.fuse or patcher.keep_originals_on != "auto":
        return None
    components = {c: m for c in COMPONENTS if (m := getattr(pipe, c, None)) is not None}
    opened = pipe.__dict__.setdefault("_lohakr_opened_files", {})
    return SourceIndex(components, pipe.__dict__.get("_lohakr_source_files"), opened)


def _present(pipe: Any, strengths: dict[str, float]) -> dict[str, float]:
    """The strengths of the components this pipeline has (a Flux pipeline has no ``unet``)."""
    return {c: v for c, v in strengths.items() if getattr(pipe, c, None) is not None}


def _get(patcher: WeightPatcher, name: str) -> PatchedAdapter:
    if name not in patcher.adapters:
        loaded = ", ".join(patcher.adapters) or "none"
        raise LohakrError(f"no LyCORIS adapter named {name!r} is loaded (loaded: {loaded})")
    return patcher.adapters[name]


def _load(pipe, path_or_dict, adapter_name, required_kind, strength, text_encoder_strength, block_weights,
          strict, allow_base_mismatch=False) -> LoadReport:
    patcher = _patcher(pipe)
    strengths = _present(pipe, component_strengths(strength, text_encoder_strength))
    adapter = path_or_dict if isinstance(path_or_dict, Adapter) else load_adapter(path_or_dict)
    if required_kind and required_kind not in adapter.kinds:
        have = ", ".join(f"{n} {KIND_NAMES[k]}" for k, n in sorted(adapter.algorithm_counts.items())) or "no modules"
        other = "load_lokr" if required_kind == "loha" else "load_loha"
        hint = other if ({"loha", "lokr"} - {required_kind}) & adapter.kinds else "load_lycoris"
        raise LohakrError(
            f"{adapter.source}: has no {KIND_NAMES[required_kind]} module ({have}); use pipe.{hint}(...)"
        )
    name = adapter_name or adapter.name
    if name in patcher.adapters:
        raise LohakrError(
            f"an adapter named {name!r} is already loaded; pass adapter_name=... or unload_lycoris({name!r}) first"
        )
    plan = plan_load(adapter, pipeline_layout(pipe), name=name, block_weights=block_weights, strengths=strengths,
                     strict=strict, allow_base_mismatch=allow_base_mismatch)
    entry = PatchedAdapter(name, plan.matches, plan.report, strengths, plan.block_weights)
    notes_before = len(patcher.originals.notes)
    patcher.add(entry, _progress(pipe, f"lohakr: {name}", len(plan.matches)), _sources(pipe, patcher))
    if not patcher.fuse:
        plan.report.originals = patcher.originals.summary()
        fallbacks = patcher.originals.notes[notes_before:]
        if fallbacks:
            plan.report.warnings.append(f"{len(fallbacks)} weight(s) differ from the file they were loaded from, so "
                                        f"their originals are kept in memory; first: {fallbacks[0]}")
    log_report(plan.report)
    return plan.report


def _progress(pipe: Any, description: str, total: int) -> Callable[[Iterable], Iterable] | None:
    """A tqdm bar in diffusers' style, off when diffusers' progress bars or logging are turned down."""
    if total < 2:
        return None
    try:
        from diffusers.utils import logging as diffusers_logging
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    config = getattr(pipe, "_progress_bar_config", None) or {}
    disabled = (
        config.get("disable", False)
        or not diffusers_logging.is_progress_bar_enabled()
        or diffusers_logging.get_verbosity() > logging.WARNING
        or logger.getEffectiveLevel() > logging.WARNING
    )
    if disabled:
        return None
    return lambda items: tqdm(items, total=total, desc=description, leave=False)
