"""Parse one adapter file (or state dict) into an ``Adapter``: modules grouped and classified
(docs/format.md#container).

Reads ``.safetensors`` only (pickles can run code and are refused), groups keys by module name,
decides the algorithm per module from its suffixes, parses alpha of any dtype or one-element
shape, and records every module it does not apply with the reason. No ΔW is built here.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import peft_config
from .errors import AdapterFormatError, AdapterShapeError, where
from .families import FAMILIES
from .lazy import lazy_module
from .metadata import (
    BASE_MODEL_NAMES,
    AdapterMetadata,
    base_model_from_names,
    base_model_from_widths,
    looks_like_a_transformer,
)
from .stored import StoredTensor, read_header, torch_dtype
from .updates import FLOAT32_MAX, UPDATE_CLASSES, LayerUpdate

torch = lazy_module("torch")

if TYPE_CHECKING:
    import torch  # noqa: F811
    from torch import Tensor

# Suffixes of the algorithms we apply, per kind.
ALGORITHM_SUFFIXES: dict[str, frozenset[str]] = {
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                       "lokr_t2", "lokr_t1"}),
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight"}),
    "full": frozenset({"diff", "diff_b"}),
}
COMMON_SUFFIXES = frozenset({"alpha", "dora_scale", "scalar"})

# Other LyCORIS/PEFT algorithms: recognised and reported as unsupported, never applied.
UNSUPPORTED_SUFFIXES: dict[str, str] = {
    "w_norm": "norm-layer diff (LyCORIS train_norm)",
    "b_norm": "norm-layer diff (LyCORIS train_norm)",
    "oft_blocks": "OFT/BOFT",
    "oft_diag": "OFT",
    "rescale": "OFT/BOFT",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "bm.weight": "GLoRA",
    "on_input": "IA3",
    "lora_A.weight": "PEFT LoRA (use diffusers' load_lora_weights)",
    "lora_B.weight": "PEFT LoRA (use diffusers' load_lora_weights)",
    "lora_A.default.weight": "PEFT LoRA (use diffusers' load_lora_weights)",
    "lora_B.default.weight": "PEFT LoRA (use diffusers' load_lora_weights)",
    "lora_magnitude_vector": "PEFT DoRA magnitude",
}

# What a model's own tensors end in (IA3 stores a ``weight`` too, always beside ``on_input``).
MODEL_WEIGHT_SUFFIXES = frozenset({"weight", "bias"})

KNOWN_SUFFIXES: tuple[str, ...] = tuple(
    sorted(
        set().union(*ALGORITHM_SUFFIXES.values(), COMMON_SUFFIXES, UNSUPPORTED_SUFFIXES, MODEL_WEIGHT_SUFFIXES),
        key=len,
        reverse=True,
    )
)

PEFT_WEIGHTS_NAME = "adapter_model.safetensors"

KIND_NAMES = {"loha": "LoHa", "lokr": "LoKr", "lora": "LoRA/LoCon", "full": "full diff"}

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


def split_key(key: str) -> tuple[str, str]:
    """``module.suffix`` → ``(module, suffix)``.

    kohya/LyCORIS module names have no dot, so the split is at the first dot (docs/format.md#key-grammar). Dotted
    diffusers/PEFT names are split before the longest known suffix instead.
    """
    module, dot, suffix = key.partition(".")
    if dot and suffix in KNOWN_SUFFIXES:
        return module, suffix
    for known in KNOWN_SUFFIXES:
        if key.endswith("." + known):
            return key[: -len(known) - 1], known
    return module, suffix


def parse_alpha(tensor: Tensor | StoredTensor, context: str) -> float:
    """Alpha from a tensor of any dtype (fp16/bf16/fp32/int64) and any one-element shape."""
    if tensor.numel() != 1:
        raise AdapterFormatError(
            f"{context}alpha has shape {tuple(tensor.shape)}; expected one value"
        )
    if isinstance(tensor, StoredTensor):
        return tensor.first_value()
    return float(tensor.reshape(-1)[0].item())


def _nonfinite_count(t: Tensor | StoredTensor) -> int:
    if isinstance(t, StoredTensor):
        return t.nonfinite_count()
    if not t.is_floating_point():
        return 0
    if math.isfinite(t.sum().item()):  # one reduction: NaN and inf carry through a sum
        return 0
    return int((~torch.isfinite(t)).sum().item())


@dataclass
class Adapter:
    """One parsed adapter file: its modules (factors only), metadata, and what was skipped."""

    source: str
    modules: dict[str, LayerUpdate]
    metadata: AdapterMetadata
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    base_model: str = "unknown"
    base_model_evidence: str = ""
    scale_source: str = ""  # where alpha came from when not from the weights (a PEFT config)
    header_only: bool = False  # read by read_adapter_header: for inspection, cannot patch

    @property
    def name(self) -> str:
        """A short name: the file stem, or ``"adapter"`` for a state dict."""
        if self.source.startswith("<"):
            return "adapter"
        return Path(self.source).stem

    @property
    def algorithm_counts(self) -> Counter:
        return Counter(m.kind for m in self.modules.values())

    @property
    def kinds(self) -> set[str]:
        return {m.kind for m in self.modules.values()}

    @property
    def base_model_name(self) -> str:
        return BASE_MODEL_NAMES[self.base_model]

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def summary(self) -> str:
        counts = ", ".join(f"{n} {KIND_NAMES[k]}" for k, n in sorted(self.algorithm_counts.items()))
        line = f"{self.name}: {counts or 'no applicable modules'}; base model {self.base_model_name}"
        if self.skipped:
            line += f"; {len(self.skipped)} not applicable"
        return line


def _read_safetensors(path: str, header_only: bool = False
                      ) -> tuple[dict[str, Tensor] | dict[str, StoredTensor], dict[str, str]]:
    """Read every tensor (or, ``header_only``, what the header says of each) and the header
    metadata; refuse pickles and broken files clearly."""
    header_length, size = _container(path)
    stored, metadata = read_header(path, header_length, size)  # checked as strictly as safetensors does
    if header_only:
        return stored, metadata
    try:
        with open(path, "rb") as handle:
            # Private and copy-on-write: the factors are views of the file's page cache, and a write
            # into one (nothing here writes) would copy a page, never change the file.
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        with contextlib.suppress(OSError, ValueError, AttributeError):  # mapped in one call, not a fault per page
            mapped.madvise(getattr(mmap, "MADV_POPULATE_READ", 22))
        return {key: _tensor_of(mapped, tensor) for key, tensor in stored.items()}, metadata
    except (OSError, RuntimeError, ValueError, TypeError) as err:
        raise AdapterFormatError(
            f"{path}: not a readable safetensors file ({err}). The file may be truncated or "
            "corrupt; re-download it"
        ) from err


def _tensor_of(mapped: mmap.mmap, stored: StoredTensor) -> Tensor:
    """One tensor of a mapped safetensors file, as a view of the mapping (no copy)."""
    dtype = torch_dtype(stored.dtype)
    if dtype is None:
        raise ValueError(f"tensor dtype {stored.dtype} is not one this torch has")
    if stored.numel() == 0:
        return torch.empty(stored.shape, dtype=dtype)
    return torch.frombuffer(mapped, dtype=dtype, count=stored.numel(), offset=stored.start).view(stored.shape)


def _container(path: str) -> tuple[int, int]:
    """The header length and file size of a safetensors file; refuses folders, pickles and files
    whose first bytes are not a safetensors header."""
    if os.path.isdir(path):
        raise AdapterFormatError(
            f"{path}: is a folder, not a file. Pass the .safetensors adapter file itself"
            + _folder_hint(path)
        )
    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot read the file ({err.strerror or err})") from err
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise AdapterFormatError(f"{path}: cannot read the file ({err.strerror or err})") from err
    if size == 0:
        raise AdapterFormatError(f"{path}: the file is empty (0 bytes); re-download or re-save it")
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    looks_like_safetensors = (
        len(head) >= 9 and 0 < header_len <= min(size - 8, _SAFETENSORS_MAX_HEADER) and head[8:9] == b"{"
    )
    if not looks_like_safetensors:
        if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
            raise AdapterFormatError(
                f"{path}: this is a pickled PyTorch checkpoint (.pt/.ckpt), not safetensors. "
                "Pickles can run arbitrary code, so lohakr does not open them; convert the file to "
                ".safetensors with a tool you trust"
            )
        raise AdapterFormatError(
            f"{path}: not a safetensors file (its header is missing or truncated). "
            "Check that the download finished; lohakr reads .safetensors adapters only"
        )
    return header_len, size


def _folder_hint(path: str) -> str:
    """What a folder holds that could be meant: its .safetensors files, by name."""
    try:
        names = sorted(entry.name for entry in os.scandir(path) if entry.name.endswith(".safetensors"))
    except OSError:
        return ""
    if not names:
        return " (it holds no .safetensors file)"
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f" (it holds {listed})"


def resolve_adapter_path(path: str | os.PathLike) -> str:
    """``path`` itself, or for a PEFT ``save_pretrained`` folder the ``adapter_model.safetensors``
    in it (its ``adapter_config.json`` is then read from beside it)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, PEFT_WEIGHTS_NAME)
        if os.path.isfile(inside):
            return inside
    return path


def load_adapter(
    path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    zero_alpha_means_rank: bool = False,
    peft_config: Mapping | str | os.PathLike | None = None,
    header_only: bool = False,
) -> Adapter:
    """Parse a LoHa/LoKr (or mixed LyCORIS) adapter from a ``.safetensors`` path or a state dict.

    Every module ends up either in ``Adapter.modules`` (LoHa, LoKr, LoRA/LoCon, full diff) or in
    ``Adapter.skipped`` with the reason. Broken modules raise ``AdapterFormatError`` naming the
    file and module. ``zero_alpha_means_rank`` reads ``alpha == 0`` as LyCORIS' modules do
    (scale 1) instead of ComfyUI/A1111's scale 0. A PEFT file's alpha and r come from
    ``peft_config`` (its ``adapter_config.json``, a path or a dict), by default the one beside
    the file; without one the scale is unknown, 1 is used and a warning says so.

    ``header_only`` (a path only) reads the header and the few values it needs, without torch:
    the same modules, checks and description, fast, but the adapter cannot patch anything.
    """
    if isinstance(path_or_state_dict, Mapping):
        source = "<state dict>"
        tensors = dict(path_or_state_dict)
        header: dict[str, str] = {}
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise AdapterFormatError(f"{source}: value of {key!r} is {type(value).__name__}, not a tensor")
    else:
        source = resolve_adapter_path(path_or_state_dict)
        tensors, header = _read_safetensors(source, header_only)
    if metadata:
        header = {**header, **{str(k): str(v) for k, v in metadata.items()}}
    if not tensors:
        raise AdapterFormatError(f"{source}: the file contains no tensors")

    info = AdapterMetadata(header, source=source)
    wd_hint = info.wd_on_output
    groups: dict[str, dict[str, Tensor]] = {}
    adapter = Adapter(source=source, modules={}, metadata=info, warnings=list(info.problems),
                      header_only=header_only and not isinstance(path_or_state_dict, Mapping))
    for key, tensor in tensors.items():
        if key.startswith("bundle_emb."):
            adapter.skipped.setdefault("bundle_emb", "bundled textual-inversion embeddings (not a layer)")
            continue
        module_name, suffix = split_key(key)
        groups.setdefault(module_name, {})[suffix] = tensor

    for module_name, group in groups.items():
        module = _build_module(module_name, group, source, adapter, wd_hint, zero_alpha_means_rank)
        if module is not None:
            adapter.modules[module_name] = module

    if not adapter.modules:
        raise AdapterFormatError(_nothing_applicable(source, groups, adapter.skipped))
    _apply_peft_config(adapter, peft_config)
    for name, module in adapter.modules.items():
        _check_scale(module, where(source, name))
    adapter.base_model, adapter.base_model_evidence = _detect_base_model(adapter)
    return adapter



def _check_scale(module: LayerUpdate, context: str) -> None:
    """The scale multiplies float32 products: one beyond float32's range turns ΔW into inf."""
    scale = module.scale
    if not math.isfinite(scale) or abs(scale) > FLOAT32_MAX:
        raise AdapterFormatError(
            f"{context}alpha {module.alpha:g} gives the scale {scale:g}, beyond float32's range: every value of "
            "ΔW would be inf. The file is corrupt"
        )


def _nothing_applicable(source: str, groups: Mapping[str, Mapping[str, Tensor]], skipped: Mapping[str, str]) -> str:
    """Why a file with no module lohakr applies is refused: a model checkpoint, other algorithms,
    or keys that are not an adapter's."""
    model_weights = [name for name, group in groups.items() if set(group) <= MODEL_WEIGHT_SUFFIXES]
    if groups and len(model_weights) * 2 >= len(groups):
        return (
            f"{source}: this is a model checkpoint, not an adapter: {len(model_weights)} of its {len(groups)} "
            f"layers are plain weights (such as {model_weights[0]}) and none is a LoHa/LoKr/LoRA module. "
            "Load it as a model (a checkpoint loader, from_single_file), and choose an adapter file here"
        )
    reasons = sorted({reason for reason in skipped.values() if reason.startswith("unsupported algorithm")})
    if reasons:
        listed = "; ".join(reasons[:4])
        return (f"{source}: no module lohakr can apply ({len(skipped)} module(s): {listed}). lohakr applies "
                "LoHa, LoKr, LoRA/LoCon and full-diff modules")
    examples = ", ".join(sorted(skipped)[:3])
    return (f"{source}: no adapter module in the file (its keys, such as {examples}, are not those of a LoHa, LoKr, "
            "LoRA/LoCon or full-diff module)")


def _apply_peft_config(adapter: Adapter, config: Mapping | str | os.PathLike | None) -> None:
    """Modules without a stored alpha take alpha and r from PEFT's config: the one given, else,
    for PEFT-named modules (``base_model.model.…``), the ``adapter_config.json`` beside the file
    (never for other files: a folder of kohya files may hold some PEFT adapter's config)."""
    peft_named = [name for name, m in adapter.modules.items()
                  if peft_config.is_peft_name(name) and m.alpha is None and m.uses_alpha]
    if config is None and peft_named and not adapter.source.startswith("<"):
        config = peft_config.config_beside(adapter.source)
    if config is None:
        if peft_named:
            message = (
                f"{adapter.source}: {len(peft_named)} module(s) have PEFT names but no alpha, and there is no "
                f"{peft_config.CONFIG_NAME} beside the file: PEFT keeps r and alpha there, so the scale "
                f"alpha/r is unknown and 1 is used. Put the {peft_config.CONFIG_NAME} PEFT saved with these "
                "weights next to the file (or pass peft_config=)"
            )
            adapter.warnings.append(message)
            warnings.warn(message, stacklevel=3)
        return
    data, source = peft_config.read_config(config)
    count = peft_config.apply_config(adapter.modules, data, source)
    if count:
        adapter.scale_source = f"alpha and r of {count} module(s) from {source} (PEFT: scale alpha/r everywhere)"


def _build_module(
    name: str,
    group: dict[str, Tensor],
    source: str,
    adapter: Adapter,
    wd_hint: bool | None,
    zero_alpha_means_rank: bool,
) -> LayerUpdate | None:
    """One module of the file as a ``LayerUpdate``, or ``None`` (recorded in ``adapter.skipped``)
    when it is not an algorithm lohakr applies."""
    context = where(source, name)
    kind = _algorithm(name, group, context, adapter)
    if kind is None:
        return None
    parts = _ModuleParts.read(group, kind, context)
    for suffix, tensor in parts.tensors():
        _check_factor(suffix, tensor, context)
    module = UPDATE_CLASSES[kind](
        name=name,
        factors=parts.factors,
        alpha=parts.alpha,
        dora_scale=parts.dora_scale,
        scalar=parts.scalar,
        source=source,
        dora_prefer_output=True if wd_hint is None else wd_hint,
        zero_alpha_means_rank=zero_alpha_means_rank,
        notes=parts.notes,
    )
    _check_alpha(module, context)
    for note in module.notes:
        adapter.warnings.append(f"{context}{note}")
        if "alpha is 0" in note or "scalar" in note:
            warnings.warn(f"{context}{note}", stacklevel=3)
    return module


def _algorithm(name: str, group: Mapping[str, Tensor], context: str, adapter: Adapter) -> str | None:
    """The one algorithm a module's keys belong to; ``None``, with the reason recorded, for model
    weights, other algorithms and unknown keys."""
    kinds = [kind for kind, suffixes in ALGORITHM_SUFFIXES.items() if suffixes & group.keys()]
    if len(kinds) > 1:
        raise AdapterFormatError(
            f"{context}mixes {' and '.join(KIND_NAMES[k] for k in kinds)} keys "
            f"({', '.join(sorted(group))}); one module holds one algorithm"
        )
    if kinds:
        return kinds[0]
    other = sorted({UNSUPPORTED_SUFFIXES[s] for s in group if s in UNSUPPORTED_SUFFIXES})
    if set(group) <= MODEL_WEIGHT_SUFFIXES:
        adapter.skipped[name] = "a model's own weight, not an adapter module"
    elif other:
        adapter.skipped[name] = f"unsupported algorithm: {', '.join(other)}"
    else:
        adapter.skipped[name] = f"unrecognised keys: {', '.join(sorted(group))}"
    return None


@dataclass
class _ModuleParts:
    """A module's keys sorted out: its factors, alpha, stored scalar, DoRA magnitude, notes."""

    factors: dict[str, Tensor] = field(default_factory=dict)
    alpha: float | None = None
    scalar: float | None = None
    dora_scale: Tensor | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, group: Mapping[str, Tensor], kind: str, context: str) -> _ModuleParts:
        parts = cls()
        for suffix, tensor in group.items():
            if suffix == "alpha":
                parts.alpha = parse_alpha(tensor, context)
            elif suffix == "scalar":
                parts.scalar = parse_alpha(tensor, context)
                if not math.isfinite(parts.scalar):
                    raise AdapterFormatError(
                        f"{context}the stored scalar is {parts.scalar}; ΔW is multiplied by it, so the file is "
                        "corrupt. Nothing was patched"
                    )
                parts.notes.append(f"has a stored scalar {parts.scalar:g}; ΔW is multiplied by it")
            elif suffix == "dora_scale":
                parts.dora_scale = tensor
            elif suffix == "lokr_t1":
                parts.notes.append("lokr_t1 is ignored: no LyCORIS version reads it")
            elif suffix in ALGORITHM_SUFFIXES[kind]:
                parts.factors[suffix] = tensor
            else:
                parts.notes.append(f"ignored unknown key {suffix!r}")
        return parts

    def tensors(self) -> list[tuple[str, Tensor]]:
        """The factors and the DoRA magnitude: what must be non-empty, floating point and finite."""
        return [*self.factors.items(), *([("dora_scale", self.dora_scale)] if self.dora_scale is not None else [])]


def _check_factor(suffix: str, tensor: Tensor, context: str) -> None:
    if not tensor.is_floating_point():
        raise AdapterFormatError(f"{context}{suffix} has dtype {tensor.dtype}; factors must be floating point")
    if tensor.numel() == 0:
        raise AdapterShapeError(
            f"{context}{suffix} has shape {tuple(tensor.shape)}, no values (rank 0?); every factor needs "
            "at least rank 1. The file is broken"
        )
    bad = _nonfinite_count(tensor)
    if bad:
        raise AdapterFormatError(
            f"{context}{suffix} contains {bad} NaN/inf value(s) of {tensor.numel()}; "
            "the file is corrupt (often a diverged training run). Nothing was patched"
        )


def _check_alpha(module: LayerUpdate, context: str) -> None:
    """A stored alpha that the scale uses must be finite; alpha 0 gets a note on how it is read."""
    alpha = module.alpha
    if alpha is None or not module.uses_alpha or module.rank is None:
        return
    if not math.isfinite(alpha):
        raise AdapterFormatError(
            f"{context}alpha is {alpha}; a finite alpha is needed for the scale alpha/rank "
            f"(rank {module.rank}). The file is corrupt"
        )
    if alpha == 0:
        module.notes.append(
            "alpha is 0: scale 1 as LyCORIS reads it (zero_alpha_means_rank=True)" if module.zero_alpha_means_rank
            else "alpha is 0: scale 0 as in ComfyUI/A1111 (pass zero_alpha_means_rank=True for LyCORIS' reading, "
            "scale 1)"
        )


def _detect_base_model(adapter: Adapter) -> tuple[str, str]:
    """Metadata first, then key prefixes; the cross-attention input width overrides both."""
    hint = adapter.metadata.base_model_hint() or base_model_from_names(adapter.modules)
    transformer = (hint is not None and hint[0] in FAMILIES) or looks_like_a_transformer(adapter.modules)
    widths = None if transformer else base_model_from_widths(_cross_attention_widths(adapter.modules.values()))
    if widths and (hint is None or widths[0] != hint[0]):
        if hint is not None:
            adapter.warnings.append(
                f"{adapter.source}: the header says {BASE_MODEL_NAMES[hint[0]]} ({hint[1]}) but "
                f"{widths[1]}, which means {BASE_MODEL_NAMES[widths[0]]}; trusting the shapes"
            )
        return widths
    return hint or ("unknown", "no metadata, and key names and shapes do not tell")


def _cross_attention_widths(modules: Iterable[LayerUpdate]) -> Iterable[tuple[str, int]]:
    for module in modules:
        if "attn2" in module.name and module.name.rstrip("_").endswith(("to_k", "to_v")):
            yield module.name, module.in_features


class AdapterCache:
    """Parsed files keyed by (path, size, mtime): re-running a graph does not re-read a file."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._entries: dict[str, tuple[tuple, Adapter]] = {}

    def load(self, path: str | os.PathLike) -> Adapter:
        path = os.fspath(path)
        try:
            stat = os.stat(path)
        except OSError as err:
            raise AdapterFormatError(f"{path}: cannot read the file ({err.strerror or err})") from err
        config = peft_config.config_beside(path)  # PEFT's alpha lives there: a change re-reads the file
        config_stat = config.stat() if config is not None else None
        stamp = (stat.st_size, stat.st_mtime_ns, config_stat and (config_stat.st_size, config_stat.st_mtime_ns))
        hit = self._entries.pop(path, None)
        if hit is not None and hit[0] == stamp:
            self._entries[path] = hit
            return hit[1]
        adapter = load_adapter(path)
        self._entries[path] = (stamp, adapter)
        while len(self._entries) > self.capacity:
            self._entries.pop(next(iter(self._entries)))
        return adapter

    def clear(self) -> None:
        self._entries.clear()


adapter_cache = AdapterCache()
