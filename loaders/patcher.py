"""The patching engine: several adapters on one set of live layers, exact and reversible.

Each touched weight's original is kept once (``originals.OriginalStore``). Every change (load,
new strength, unload) recomputes the touched weights from their originals:

    W = W0 + Σ_k μ_k · s_k · R_k        (non-DoRA adapters, summed in adapter-name order)
    W ← W + μ·(DoRA(W + s·R) − W)        (then each DoRA adapter, in load order)

in float32, cast once into the live parameter (``apply.patch``). The sum order is fixed by name, so
the result does not depend on load order; DoRA depends on what it is applied to, so DoRA adapters
apply in load order. Unloading the last adapter of a weight puts the original back: bit-identical.

Every change is a transaction: the write guard checks every layer before any is written, and if
anything fails the loaded adapters and the weights are as before. Several changes can be batched
(``with patcher.batch(): ...``): every touched weight is then recomputed once at the end, so
stacking k adapters costs O(k), not O(k²). With ``fuse=True`` nothing is kept (``fuse.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import apply
from .apply import Contribution, Workspace
from .blocks import BlockWeights
from .errors import FusedAdapterError, FusedPartlyError
from .fuse import fuse_into_weights
from .guard import check_layer
from .names import LayerTarget
from .originals import OriginalStore, layer_of
from .plan import composed_strength
from .report import LoadReport
from .resolve import Match
from .sources import SourceIndex


@dataclass(eq=False)
class PatchedAdapter:
    """One adapter in the engine: its matched modules and how strongly each component applies."""

    name: str
    matches: list[Match]
    report: LoadReport
    component_strength: dict[str, float] = field(default_factory=dict)
    block_weights: BlockWeights = field(default_factory=BlockWeights)
    order: int = 0
    fused: bool = False  # added into the weights with no original kept: final

    def strength_of(self, match: Match) -> float:
        return composed_strength(self.component_strength, self.block_weights, match)

    @property
    def targets(self) -> list[LayerTarget]:
        """Each layer this adapter touches, once."""
        return list({m.target.key: m.target for m in self.matches}.values())

    def settings(self) -> tuple:
        """What a strength change alters, to put back if it fails."""
        return (dict(self.component_strength), self.block_weights, dict(self.report.strength),
                self.report.block_weights)

    def restore_settings(self, settings: tuple) -> None:
        component_strength, self.block_weights, report_strength, self.report.block_weights = settings
        self.component_strength, self.report.strength = dict(component_strength), dict(report_strength)


@dataclass
class _Registry:
    """The loaded adapters and their settings at one moment: what a failed change goes back to."""

    adapters: dict[str, PatchedAdapter]
    settings: dict[str, tuple]


class WeightPatcher:
    """Applies adapters to live layers and restores them; see the module docstring."""

    def __init__(self, keep_originals_on: str | torch.device | None = "auto", fuse: bool = False):
        """``keep_originals_on``: where originals are kept for exact unloading. ``"auto"`` (default):
        on the weight's own device when that is the CPU, or a GPU that keeps a safe margin free
        (fast, no copy); else on the CPU. ``"cpu"``: always on the CPU (no extra GPU memory).
        ``None``: always on the weight's own device. ``fuse=True``: keep nothing, add adapters into
        the weights for good (see the module docstring)."""
        self.keep_originals_on = keep_originals_on
        self.fuse = fuse
        self.adapters: dict[str, PatchedAdapter] = {}
        self.originals = OriginalStore(keep_originals_on)
        self._counter = 0
        self._pending: dict[str, LayerTarget] | None = None  # targets to recompute when a batch ends

    # -- public -------------------------------------------------------------------------------
    def add(self, adapter: PatchedAdapter, progress: Callable[[Iterable], Iterable] | None = None,
            sources: SourceIndex | None = None) -> None:
        """Apply ``adapter``; on any error the weights and the loaded adapters are as before.
        ``sources``: the files the model's weights came from, where originals may stay."""
        if adapter.name in self.adapters:
            raise ValueError(f"an adapter named {adapter.name!r} is already loaded")
        self._counter += 1
        adapter.order = self._counter
        if self.fuse:
            fuse_into_weights(adapter.name, adapter.targets, self._index([adapter]), progress)
            adapter.fused = True
            self.adapters[adapter.name] = adapter
            return
        with self._transaction(adapter.targets, progress):
            self.adapters[adapter.name] = adapter
            self.originals.keep(adapter.targets, sources)

    def update(self, name: str, progress=None, *, component_strength: Mapping[str, float] | None = None,
               block_weights: BlockWeights | None = None) -> None:
        """Give adapter ``name`` new strengths and/or block weights (``None`` keeps them) and recompute
        every weight it touches; on any error it keeps its old ones and the weights are as before."""
        self.check_changeable(name, "change its strength")
        adapter = self.adapters[name]
        with self._transaction(adapter.targets, progress):
            if component_strength is not None:
                adapter.component_strength = dict(component_strength)
            if block_weights is not None:
                adapter.block_weights = block_weights

    def remove(self, name: str, progress=None) -> None:
        """Unload adapter ``name``: its weights are recomputed without it (originals back, bit for bit,
        where no adapter is left)."""
        self.check_changeable(name, "unload it")
        with self._transaction(self.adapters[name].targets, progress):
            del self.adapters[name]

    @contextlib.contextmanager
    def batch(self, progress: Callable[[int], Callable[[Iterable], Iterable] | None] | None = None):
        """A transaction over several changes: adds, updates and removes inside the block only record
        what they touch, and each touched weight is recomputed once when the block ends. If anything
        in the block raises, or the final pass fails, the weights and the loaded adapters are exactly
        as before the block and the error is raised. ``progress(total)`` may give a progress wrapper
        for the final pass. With ``fuse=True`` loads are final at once: a failed batch that had fused
        an adapter raises ``FusedPartlyError``."""
        if self._pending is not None:  # nested: the outer batch does the work
            yield self
            return
        before = self._snapshot()
        self._pending = {}
        try:
            yield self
        except BaseException as err:
            pending, self._pending = list(self._pending.values()), None
            self._restore_registry(before)
            self._forget_unpatched(pending)  # nothing was written yet: forget what was kept
            fused = [n for n, a in self.adapters.items() if a.fused and n not in before.adapters]
            if fused:
                raise FusedPartlyError(f"the batch failed ({err}) after fusing {', '.join(fused)} into the "
                                       "weights, which cannot be undone: reload the model") from err
            raise
        pending, self._pending = list(self._pending.values()), None
        try:
            self._recompute(pending, progress(len(pending)) if progress else None)
        except BaseException:
            self._restore_registry(before)
            self._recompute(pending, None)
            raise

    def check_changeable(self, name: str, what: str) -> None:
        """Raise ``FusedAdapterError`` if adapter ``name`` is fused (``what``: the refused action)."""
        if self.adapters[name].fused:
            raise FusedAdapterError(
                f"{name!r} is fused into the weights (fuse=True keeps no originals), so there is no way "
                f"to {what}; reload the model, or load without fuse=True to keep that possible"
            )

    @property
    def kept_bytes(self) -> int:
        return self.originals.kept_bytes

    # -- internals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _transaction(self, targets: list[LayerTarget], progress) -> Iterator[None]:
        """One change to the loaded adapters (the block), then the touched weights recomputed, or
        in a batch recorded for its end. If either raises, the change is undone and the weights are
        recomputed as before (in a batch nothing was written yet)."""
        before = self._snapshot()
        try:
            yield
            if self._pending is not None:
                self._pending.update((t.key, t) for t in targets)
            else:
                self._recompute(targets, progress)
        except BaseException:
            self._restore_registry(before)
            if self._pending is not None:
                self._forget_unpatched(targets)
            else:
                self._recompute(targets, None)
            raise

    def _snapshot(self) -> _Registry:
        return _Registry(dict(self.adapters), {name: a.settings() for name, a in self.adapters.items()})

    def _restore_registry(self, before: _Registry) -> None:
        self.adapters = dict(before.adapters)
        for name, settings in before.settings.items():
            self.adapters[name].restore_settings(settings)

    def _forget_unpatched(self, targets: list[LayerTarget]) -> None:
        touched = {m.target.key for a in self.adapters.values() for m in a.matches}
        self.originals.forget_unpatched(targets, touched)

    def _recompute(self, targets: Iterable[LayerTarget], progress) -> None:
        """Write every target from its original and the adapters now loaded: every layer checked by
        the write guard first, then new storage taken for those still holding their original, then
        each layer written (or given its original back when no adapter touches it any more)."""
        targets = list(targets)
        index = self._index()
        workspace = Workspace()
        self.originals.check_files(targets)
        for target in targets:
            kept = self.originals.get(target.key)
            if kept is not None and index.get(target.key):
                check_layer(target.key, self.originals.original_values(target), layer_of(target).weight.detach(),
                            index[target.key], workspace)
        # New storage for every weight that still is its original, taken before any layer's working
        # buffers: allocated in between, the long-lived weights pin the freed buffers' heap pages
        # (resident memory that only malloc_trim would give back).
        new_storage = {}
        for target in targets:
            kept = self.originals.get(target.key)
            live = layer_of(target).weight
            if kept is not None and kept.file is None and index.get(target.key) and apply.shares_memory(live,
                                                                                                        kept.weight):
                new_storage[target.key] = torch.empty_like(live)
        with torch.no_grad():
            for target in progress(targets) if progress else targets:
                if self.originals.get(target.key) is None:
                    continue
                contributions = index.get(target.key)
                if contributions:
                    self._write_layer(target, contributions, workspace, new_storage.pop(target.key, None))
                else:
                    self.originals.put_back(target)

    def _write_layer(self, target: LayerTarget, contributions: list[Contribution], workspace: Workspace,
                     storage: Tensor | None) -> None:
        """``W0 + Σ contributions`` into the layer; to new storage (``storage`` if given) while the
        live weight still is an original kept in memory, else in place (over patched values, or
        over a weight whose original is its source file)."""
        layer = layer_of(target)
        param = layer.weight
        if not self.originals.write_from_file(target, contributions, workspace):
            source = self.originals.source_for_write(target)  # may move a file original to memory
            kept = self.originals.get(target.key)
            fresh = kept.file is None and apply.shares_memory(param, kept.weight)
            weight = (storage if storage is not None else torch.empty_like(param)) if fresh else param.detach()
            apply.patch(weight, source, contributions, workspace)
            if fresh:
                param.data = weight
        kept = self.originals.get(target.key)
        if kept.bias is not None:
            apply.write_bias(layer, kept.bias, contributions, in_place=False)

    def _index(self, adapters: Iterable[PatchedAdapter] | None = None) -> dict[str, list[Contribution]]:
        """``contributions_by_layer`` of the loaded adapters (or of ``adapters``)."""
        return contributions_by_layer(self.adapters.values() if adapters is None else adapters)

    def __iter__(self) -> Iterator[PatchedAdapter]:
        return iter(self.adapters.values())


def contributions_by_layer(adapters: Iterable[PatchedAdapter]) -> dict[str, list[Contribution]]:
    """Per layer key, the (update, strength) pairs to apply, in the order that makes the result
    independent of load order: plain ones by adapter name, then DoRA ones in load order. Fused
    adapters are part of the weights already and are left out. ``bake`` uses the same order, so a
    baked checkpoint holds the bits a live load gives."""
    plain: dict[str, list[tuple[PatchedAdapter, Match]]] = {}
    dora: dict[str, list[tuple[PatchedAdapter, Match]]] = {}
    for adapter in adapters:
        if adapter.fused:
            continue
        for match in adapter.matches:
            bucket = dora if match.module.dora else plain
            bucket.setdefault(match.target.key, []).append((adapter, match))
    index: dict[str, list[Contribution]] = {}
    for key in set(plain) | set(dora):
        ordered = sorted(plain.get(key, []), key=lambda item: item[0].name) + sorted(
            dora.get(key, []), key=lambda item: item[0].order)
        index[key] = [(match.module, adapter.strength_of(match)) for adapter, match in ordered]
    return index
