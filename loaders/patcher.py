"""The patching engine: several adapters on one set of live layers, exact and reversible.

Each touched weight's original is kept once. Every change (load, new strength, unload)
recomputes the touched weights from their originals:

    W = W0 + Σ_k μ_k · s_k · R_k        (non-DoRA adapters, summed in adapter-name order)
    W ← W + μ·(DoRA(W + s·R) − W)        (then each DoRA adapter, in load order)

in float32, cast once into the live parameter. The sum order is fixed by name, so the result does
not depend on load order; DoRA depends on what it is applied to, so DoRA adapters apply in load
order. Unloading the last adapter of a weight puts the original back: bit-identical.

Where the original stays on the weight's own device, it is not copied at all: the parameter keeps
its ``Parameter`` object but gets new storage for the patched values, and the old storage *is*
the kept original (unloading swaps it back). Where originals go elsewhere (a GPU model with
originals on the CPU), they are copied and the parameter is patched in place.

With ``fuse=True`` nothing is kept: each load adds its update into the live weights in place
(W ← cast(W + Σ μ·s·R), what LyCORIS' merge does), using no memory beyond a row block, but the
adapter can then neither change strength nor be unloaded.

Several changes can be batched (``with patcher.batch(): ...``): every touched weight is then
recomputed once at the end, so stacking k adapters costs O(k), not O(k²).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .blocks import BlockWeights
from .errors import FusedAdapterError, FusedPartlyError
from .guard import check_patch
from .modules import AdapterModule
from .names import LayerTarget
from .rebuild import Scratch, row_chunks
from .report import LoadReport
from .resolve import Match

logger = logging.getLogger("lohakr")


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
        component = match.target.component
        return self.component_strength.get(component, 1.0) * self.block_weights(match.block)

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


@dataclass(eq=False)
class _Original:
    target: LayerTarget
    weight: Tensor
    bias: Tensor | None


# "auto" keeps originals on the GPU only when this much GPU memory stays free afterwards: the larger
# of 4 GiB and a fifth of the card (room for SDXL activations and the VAE decode).
AUTO_GPU_MARGIN_BYTES = 4 << 30
AUTO_GPU_MARGIN_FRACTION = 0.2


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
        self._originals: dict[str, _Original] = {}
        self._counter = 0
        self._pending: dict[str, LayerTarget] | None = None  # targets to recompute when a batch ends

    # -- public -------------------------------------------------------------------------------
    def add(self, adapter: PatchedAdapter, progress: Callable[[Iterable], Iterable] | None = None) -> None:
        """Apply ``adapter``; on any error the weights and the loaded adapters are as before."""
        if adapter.name in self.adapters:
            raise ValueError(f"an adapter named {adapter.name!r} is already loaded")
        self._counter += 1
        adapter.order = self._counter
        if self.fuse:
            self._fuse(adapter, progress)
            return
        with self._transaction(adapter.targets, progress):
            self.adapters[adapter.name] = adapter
            self._keep_originals(adapter.targets)

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
            self._release_unpatched(pending)  # nothing was written yet: forget what was kept
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
        return sum(_nbytes(o.weight) + (_nbytes(o.bias) if o.bias is not None else 0)
                   for o in self._originals.values())

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
                self._release_unpatched(targets)
            else:
                self._recompute(targets, None)
            raise

    def _snapshot(self) -> "_Registry":
        return _Registry(dict(self.adapters), {name: a.settings() for name, a in self.adapters.items()})

    def _restore_registry(self, before: "_Registry") -> None:
        self.adapters = dict(before.adapters)
        for name, settings in before.settings.items():
            self.adapters[name].restore_settings(settings)

    def _fuse(self, adapter: PatchedAdapter, progress) -> None:
        """Add ``adapter`` into the live weights in place, keeping nothing."""
        contributions = self._index([adapter])
        scratch = Scratch()
        targets = adapter.targets
        _refuse_meta(targets)
        for target in targets:
            weight = _layer(target).weight.detach()
            _check_finite(target, weight, contributions[target.key], scratch)
        done = 0
        try:
            for target in (progress(targets) if progress else targets):
                layer = _layer(target)
                bias = getattr(layer, "bias", None)
                current = _Original(target, layer.weight.detach(), None if bias is None else bias.detach())
                with torch.no_grad():
                    self._apply(layer, current, contributions[target.key], scratch, in_place=True)
                done += 1
        except BaseException as err:
            if done:
                raise FusedPartlyError(
                    f"fusing {adapter.name!r} failed after {done} of {len(targets)} layers ({err}); those "
                    "layers are changed and nothing was kept to undo it: reload the model"
                ) from err
            raise
        adapter.fused = True
        self.adapters[adapter.name] = adapter

    def _keep_originals(self, targets: list[LayerTarget]) -> None:
        new = [t for t in targets if t.key not in self._originals]
        _refuse_meta(new)
        placement = originals_placement(self.keep_originals_on, [_layer(t).weight for t in new])
        for target in new:
            layer = _layer(target)
            weight = layer.weight.detach()
            device = placement[weight.device]
            bias = getattr(layer, "bias", None)
            self._originals[target.key] = _Original(
                target,
                weight if device == weight.device else weight.to(device, copy=True),
                None if bias is None else bias.detach().to(device, copy=device != bias.device),
            )

    def _release_unpatched(self, targets: list[LayerTarget]) -> None:
        """Forget the originals of weights no adapter touches and that were never patched."""
        touched = {m.target.key for a in self.adapters.values() for m in a.matches}
        for target in targets:
            kept = self._originals.get(target.key)
            if kept is not None and target.key not in touched and _shares(_layer(target).weight, kept.weight):
                del self._originals[target.key]

    def _recompute(self, targets: Iterable[LayerTarget], progress) -> None:
        targets = list(targets)
        index = self._index()
        scratch = Scratch()
        for target in targets:  # the write guard: every layer checked before any is written
            kept = self._originals.get(target.key)
            if kept is not None and index.get(target.key):
                _check_finite(target, kept.weight, index[target.key], scratch, _layer(target).weight)
        # New storage for every weight that still is its kept original, taken before any layer's
        # working buffers: allocated in between, the long-lived weights pin the freed buffers'
        # heap pages (full-SDXL LoHa: +150-230 MiB resident that malloc_trim gives back).
        new_storage = {}
        for target in targets:
            kept = self._originals.get(target.key)
            if kept is not None and index.get(target.key) and _shares(_layer(target).weight, kept.weight):
                new_storage[target.key] = torch.empty_like(_layer(target).weight)
        iterator: Iterable[LayerTarget] = progress(targets) if progress else targets
        for target in iterator:
            kept = self._originals.get(target.key)
            if kept is None:
                continue
            layer = _layer(target)
            contributions = index.get(target.key, [])
            with torch.no_grad():
                if not contributions:
                    _restore(layer.weight, kept.weight)
                    if kept.bias is not None:
                        _restore(layer.bias, kept.bias)
                    del self._originals[target.key]
                    continue
                self._apply(layer, kept, contributions, scratch, storage=new_storage.pop(target.key, None))

    def _apply(self, layer: nn.Module, kept: "_Original", contributions, scratch: Scratch,
               in_place: bool = False, storage: Tensor | None = None) -> None:
        """Write ``W0 + Σ contributions`` into the layer (``_write_weight``). If the live weight still
        is the kept original, the result goes to new storage instead (``storage`` if given), unless
        ``in_place`` (fusing: ``kept`` is the live weight itself)."""
        param = layer.weight
        device = param.device
        fresh = not in_place and _shares(param, kept.weight)
        weight = (storage if storage is not None else torch.empty_like(param)) if fresh else param.detach()
        source = kept.weight if kept.weight.device == device else kept.weight.to(device)
        _write_weight(weight, source, contributions, scratch)
        if fresh:
            param.data = weight
        if kept.bias is not None:
            bias_work = None
            for _, module, strength in contributions:
                if module.has_bias_delta and strength != 0:
                    if bias_work is None:
                        bias_work = kept.bias.to(device=device, dtype=torch.float32, copy=True)
                    bias_work.add_(module.bias_delta(device), alpha=strength)
            if bias_work is None:
                _restore(layer.bias, kept.bias)
            elif not in_place and _shares(layer.bias, kept.bias):
                layer.bias.data = bias_work.to(layer.bias.dtype)
            else:
                layer.bias.copy_(bias_work)

    def _index(self, adapters: Iterable[PatchedAdapter] | None = None
               ) -> dict[str, list[tuple[PatchedAdapter, AdapterModule, float]]]:
        """Per layer key: (adapter, module, strength) to apply, plain ones by name, then DoRA ones
        in load order. Fused adapters are part of the weights already and are left out."""
        plain: dict[str, list] = {}
        dora: dict[str, list] = {}
        for adapter in self.adapters.values() if adapters is None else adapters:
            if adapter.fused:
                continue
            for match in adapter.matches:
                bucket = dora if match.module.dora else plain
                bucket.setdefault(match.target.key, []).append((adapter, match.module, adapter.strength_of(match)))
        index: dict[str, list] = {}
        for key in set(plain) | set(dora):
            index[key] = sorted(plain.get(key, []), key=lambda i: i[0].name) + sorted(
                dora.get(key, []), key=lambda i: i[0].order)
        return index

    def __iter__(self) -> Iterator[PatchedAdapter]:
        return iter(self.adapters.values())


def _write_weight(weight: Tensor, source: Tensor, contributions, scratch: Scratch) -> None:
    """``weight = source + Σ contributions``, computed in float32 and cast once: in one operation
    when a lone module can (``write_patched``), else a block of rows at a time through one reused
    float32 buffer, else (input-axis DoRA, strided weights) the whole layer at once."""
    device, shape = weight.device, tuple(weight.shape)
    contiguous = weight.is_contiguous() and source.is_contiguous()
    if contiguous and len(contributions) == 1:
        _, module, strength = contributions[0]
        if module.write_patched(weight, source, strength, scratch):
            return
    if contiguous and all(m.works_by_rows(shape) for _, m, _ in contributions):
        out_dim = shape[0]
        rows, original = weight.view(out_dim, -1), source.view(out_dim, -1)
        align = contributions[0][1].row_alignment
        with contextlib.ExitStack() as stack:
            for _, module, _ in contributions:
                stack.enter_context(module.float_factors())
            budget = min(module.chunk_elements(device) for _, module, _ in contributions)
            for chunk in row_chunks(out_dim, rows.shape[1], align=align, budget=budget):
                work = scratch.get(device, (chunk.stop - chunk.start, rows.shape[1]))
                work.copy_(original[chunk])
                for _, module, strength in contributions:
                    module.add_rows(work, chunk.start, chunk.stop, strength, scratch)
                rows[chunk].copy_(work)
        return
    work = source.to(device=device, dtype=torch.float32, copy=True)
    for _, module, strength in contributions:
        module.add_to(work, strength, scratch)
    weight.copy_(work)


def _check_finite(target: LayerTarget, original: Tensor, contributions, scratch: Scratch,
                  live: Tensor | None = None) -> None:
    """``guard.check_patch`` for one layer: ``original`` patched by ``contributions`` must be finite
    in the live weight's dtype (``live``, default ``original``); the trial, when one is needed, is
    built into a scratch tensor, never into the weight."""
    live = original if live is None else live

    def trial() -> Tensor:
        out = torch.empty(live.shape, dtype=live.dtype, device=live.device)
        source = original if original.device == live.device else original.to(live.device)
        with torch.no_grad():
            _write_weight(out, source.contiguous(), contributions, scratch)
        return out

    check_patch([(module, strength) for _, module, strength in contributions], live.dtype, target.key, trial)


def originals_placement(policy: str | torch.device | None, weights: list[Tensor]) -> dict[torch.device, torch.device]:
    """Where to keep the originals of ``weights``, per weight device, under ``policy``."""
    devices = {w.device for w in weights}
    if policy is None:
        return {d: d for d in devices}
    if policy != "auto":
        return {d: torch.device(policy) for d in devices}
    placement = {}
    for device in devices:
        if device.type != "cuda":
            placement[device] = device
            continue
        needed = sum(_nbytes(w) for w in weights if w.device == device)
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        margin = max(AUTO_GPU_MARGIN_BYTES, int(AUTO_GPU_MARGIN_FRACTION * total))
        placement[device] = device if free - needed >= margin else torch.device("cpu")
    return placement


def _refuse_meta(targets: list[LayerTarget]) -> None:
    for target in targets:
        if _layer(target).weight.device.type == "meta":
            raise ValueError(
                f"{target.key}: the weight is on the meta device (sequential CPU offload or an "
                "unloaded model); load adapters before enable_sequential_cpu_offload()"
            )


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _shares(a: Tensor, b: Tensor) -> bool:
    """True when a live tensor still is its kept original (same memory)."""
    return a.device == b.device and a.data_ptr() == b.data_ptr()


def _restore(param: Tensor, original: Tensor) -> None:
    """Put the original values back: by swapping the storage in when it fits the parameter as it is
    now (no copy, bit-identical), else by copying (the model moved or changed dtype since)."""
    if _shares(param, original):
        return
    if (original.device, original.dtype, original.shape, original.stride()) == (
            param.device, param.dtype, param.shape, param.stride()):
        param.data = original
    else:
        param.copy_(original)


def _layer(target: LayerTarget) -> nn.Module:
    if target.layer is None:
        raise ValueError(f"{target.key}: this layout has no live layer to patch")
    return target.layer
