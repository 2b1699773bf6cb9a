"""The patching engine: several adapters on one set of live layers, exact and reversible.

Each touched weight's original is kept once (on the CPU by default). Every change (load, new
strength, unload) recomputes the touched weights from their originals:

    W = W0 + Σ_k μ_k · s_k · R_k        (non-DoRA adapters, summed in adapter-name order)
    W ← W + μ·(DoRA(W + s·R) − W)        (then each DoRA adapter, in load order)

in float32, cast once into the live parameter (in place, so hooks and offloading keep working).
The sum order is fixed by name, so the result does not depend on load order; DoRA depends on
what it is applied to, so DoRA adapters apply in load order. Unloading the last adapter of a
weight copies the original back: bit-identical.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from .blocks import BlockWeights
from .modules import AdapterModule
from .names import LayerTarget
from .rebuild import CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, row_chunks
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

    def strength_of(self, match: Match) -> float:
        component = match.target.component
        return self.component_strength.get(component, 1.0) * self.block_weights(match.block)

    @property
    def targets(self) -> list[LayerTarget]:
        """Each layer this adapter touches, once."""
        return list({m.target.key: m.target for m in self.matches}.values())


@dataclass(eq=False)
class _Original:
    target: LayerTarget
    weight: Tensor
    bias: Tensor | None


class WeightPatcher:
    """Applies adapters to live layers and restores them; see the module docstring."""

    def __init__(self, keep_originals_on: str | torch.device | None = "cpu"):
        """``keep_originals_on``: where originals are kept, ``"cpu"`` (default: no extra GPU memory)
        or ``None`` for the weight's own device (fastest on a GPU with memory to spare)."""
        self.keep_originals_on = keep_originals_on
        self.adapters: dict[str, PatchedAdapter] = {}
        self._originals: dict[str, _Original] = {}
        self._counter = 0

    # -- public -------------------------------------------------------------------------------
    def add(self, adapter: PatchedAdapter, progress: Callable[[Iterable], Iterable] | None = None) -> None:
        if adapter.name in self.adapters:
            raise ValueError(f"an adapter named {adapter.name!r} is already loaded")
        self._counter += 1
        adapter.order = self._counter
        self.adapters[adapter.name] = adapter
        touched = adapter.targets
        try:
            for target in touched:
                self._keep_original(target)
            self._recompute(touched, progress)
        except BaseException:
            del self.adapters[adapter.name]
            self._recompute(touched, None)
            raise

    def update(self, name: str, progress=None) -> None:
        """Recompute every weight ``name`` touches (after its strengths changed)."""
        self._recompute(self.adapters[name].targets, progress)

    def remove(self, name: str, progress=None) -> None:
        self._recompute(self.adapters.pop(name).targets, progress)

    @property
    def kept_bytes(self) -> int:
        return sum(o.weight.numel() * o.weight.element_size()
                   + (o.bias.numel() * o.bias.element_size() if o.bias is not None else 0)
                   for o in self._originals.values())

    # -- internals ------------------------------------------------------------------------------
    def _keep_original(self, target: LayerTarget) -> None:
        if target.key in self._originals:
            return
        layer = _layer(target)
        if layer.weight.device.type == "meta":
            raise ValueError(
                f"{target.key}: the weight is on the meta device (sequential CPU offload or an "
                "unloaded model); load adapters before enable_sequential_cpu_offload()"
            )
        device = torch.device(self.keep_originals_on or layer.weight.device)
        weight = _copy_to(layer.weight.detach(), device)
        bias = _copy_to(layer.bias.detach(), device) if getattr(layer, "bias", None) is not None else None
        self._originals[target.key] = _Original(target, weight, bias)

    def _recompute(self, targets: Iterable[LayerTarget], progress) -> None:
        targets = list(targets)
        index = self._index()
        scratch = _Scratch()
        iterator: Iterable[LayerTarget] = progress(targets) if progress else targets
        for target in iterator:
            kept = self._originals.get(target.key)
            if kept is None:
                continue
            layer = _layer(target)
            contributions = index.get(target.key, [])
            with torch.no_grad():
                if not contributions:
                    layer.weight.copy_(kept.weight)
                    if kept.bias is not None:
                        layer.bias.copy_(kept.bias)
                    del self._originals[target.key]
                    continue
                self._apply(layer, kept, contributions, scratch)

    def _apply(self, layer: nn.Module, kept: "_Original", contributions, scratch: "_Scratch") -> None:
        """Write ``W0 + Σ contributions`` into the layer: a block of rows at a time through one
        reused float32 buffer (no layer-sized temporaries), or the whole layer for input-axis DoRA."""
        weight = layer.weight
        device, shape = weight.device, tuple(weight.shape)
        source = kept.weight if kept.weight.device == device else kept.weight.to(device)
        if weight.is_contiguous() and all(m.works_by_rows(shape) for _, m, _ in contributions):
            out_dim = shape[0]
            rows, original = weight.view(out_dim, -1), source.view(out_dim, -1)
            align = contributions[0][1].row_alignment
            with contextlib.ExitStack() as stack:
                for _, module, _ in contributions:
                    stack.enter_context(module.float_factors())
                budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS
                for chunk in row_chunks(out_dim, rows.shape[1], align=align, budget=budget):
                    work = scratch.get(device, (chunk.stop - chunk.start, rows.shape[1]))
                    work.copy_(original[chunk])
                    for _, module, strength in contributions:
                        module.add_rows(work, chunk.start, chunk.stop, strength)
                    rows[chunk].copy_(work)
        else:
            work = source.to(device=device, dtype=torch.float32, copy=True)
            for _, module, strength in contributions:
                module.add_to(work, strength)
            weight.copy_(work)
            del work
        if kept.bias is not None:
            bias_work = None
            for _, module, strength in contributions:
                if module.has_bias_delta and strength != 0:
                    if bias_work is None:
                        bias_work = kept.bias.to(device=device, dtype=torch.float32, copy=True)
                    bias_work.add_(module.bias_delta(device), alpha=strength)
            layer.bias.copy_(bias_work if bias_work is not None else kept.bias)

    def _index(self) -> dict[str, list[tuple[PatchedAdapter, AdapterModule, float]]]:
        plain: dict[str, list] = {}
        dora: dict[str, list] = {}
        for adapter in self.adapters.values():
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


class _Scratch:
    """One float32 work buffer per device, reused for every block of rows of every layer."""

    def __init__(self):
        self.buffers: dict[torch.device, Tensor] = {}

    def get(self, device: torch.device, shape: tuple[int, int]) -> Tensor:
        need = shape[0] * shape[1]
        buffer = self.buffers.get(device)
        if buffer is None or buffer.numel() < need:
            buffer = torch.empty(max(need, CHUNK_ELEMENTS), dtype=torch.float32, device=device)
            self.buffers[device] = buffer
        return buffer[:need].view(shape)


def _copy_to(tensor: Tensor, device: torch.device) -> Tensor:
    """A copy on ``device``; ``clone`` when it stays put (the fastest same-device copy)."""
    return tensor.clone() if tensor.device == device else tensor.to(device, copy=True)


def _layer(target: LayerTarget) -> nn.Module:
    if target.layer is None:
        raise ValueError(f"{target.key}: this layout has no live layer to patch")
    return target.layer
