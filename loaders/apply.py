"""How a weight gets changed: one entry, ``patch``, and the strategy it picks for a set of updates
on one weight (docs/architecture.md#strategies).

``patch(out, source, contributions)`` writes ``source`` patched by every ``(update, strength)`` into
``out`` (``out`` may be ``source``), with the float32 math of docs/format.md#precision and one cast
at the end, by the first strategy that fits:

1. **one pass** for a lone update on a CPU weight (``ONE_PASS_STRATEGIES``): the native kernels
   (``native``: LoKr on half/bfloat16 weights, LoHa's fused GEMM kernel, LoHa's element-wise
   kernel), then a single PyTorch multiply-add in the weight's own dtype (LoKr with factors exact
   in it). Each gives the bits of strategy 3 and is checked to (``native``'s self-checks,
   ``rebuild.addcmul_rounds_once``);
2. **float32 row blocks** for every update that works by rows (all but input-axis DoRA): a block
   of rows is widened once, each update added (``add_rows``), narrowed once;
3. **the whole layer** in float32: input-axis DoRA (its norms need every row), strided weights.

Each algorithm has two code paths that must agree bit for bit, PyTorch's and the native kernels'
(tests/test_native.py and tests/test_lokr_direct.py compare them); the PyTorch path of strategies
2 and 3 is the reference. ``delta`` and ``patched_weight`` are conveniences built on the same
pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import native, rebuild
from .updates import FactorCache, LayerUpdate, LohaUpdate, LokrUpdate, PlacedUpdate, cached

Contribution = tuple[LayerUpdate, float]  # an update and the strength it applies at

class Workspace:
    """One patching pass's working memory: reusable float32 buffers, one per (device, slot), so row
    blocks are built into memory already faulted in instead of fresh allocations; and the factor
    cache of the weight being patched (cleared after each weight, so factors never pile up)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, int], Tensor] = {}
        self.cache = FactorCache()

    def buffer(self, device: torch.device, shape: tuple[int, int], slot: int = 0) -> Tensor:
        """A float32 ``shape`` view of slot ``slot``'s buffer on ``device``, grown as needed."""
        need = shape[0] * shape[1]
        key = (torch.device(device), slot)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < need:
            buffer = self.buffers[key] = torch.empty(max(need, rebuild.CHUNK_ELEMENTS), dtype=torch.float32,
                                                     device=device)
        return buffer[:need].view(shape)


# -- the entry ---------------------------------------------------------------------------------------
def patch(out: Tensor, source: Tensor, contributions: Sequence[Contribution],
          workspace: Workspace | None = None) -> None:
    """``out = source + every contribution``, in float32, cast once into ``out``'s dtype. ``out``
    and ``source`` have the same shape and dtype; ``out`` may be ``source`` (in place). Plain
    updates are summed in the order given; DoRA ones rescale what comes before them. Never
    recorded by autograd (a host may call it with grad enabled)."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return patch(out, source, contributions, workspace)
    workspace = workspace or Workspace()
    shape = tuple(out.shape)
    contributions = [(update, strength) for update, strength in contributions if strength != 0]
    for update, _ in contributions:
        update.check_shape(shape)
    try:
        if not contributions:
            if out.data_ptr() != source.data_ptr():
                out.copy_(source)
            return
        if any(isinstance(update, PlacedUpdate) for update, _ in contributions):
            _placed_rows(out, source, contributions, workspace)
            return
        contiguous = out.is_contiguous() and source.is_contiguous()
        if contiguous and len(contributions) == 1 and one_pass(out, source, *contributions[0], workspace):
            return
        if contiguous and all(works_by_rows(update, shape) for update, _ in contributions):
            _row_blocks(out, source, contributions, workspace)
            return
        _whole_layer(out, source, contributions, workspace)
    finally:
        workspace.cache.clear()


def add_to(weight: Tensor, update: LayerUpdate, strength: float, workspace: Workspace | None = None) -> Tensor:
    """``weight`` patched in place by one update (ComfyUI's float32 patch functions); returns it."""
    patch(weight, weight, [(update, strength)], workspace)
    return weight


def works_by_rows(update: LayerUpdate, weight_shape: tuple[int, ...]) -> bool:
    """True when ``update`` can patch a block of output rows at a time: all but input-axis DoRA."""
    return update.dora_scale is None or update.dora_axis(weight_shape) == "out"


# -- strategy 1: one pass ----------------------------------------------------------------------------
def _native_one_pass(out: Tensor, source: Tensor, update: LayerUpdate, value: float, workspace: Workspace) -> bool:
    """The native kernels: LoKr on half/bfloat16 CPU weights (any factors); LoHa's fused kernel where
    its (dtype, rank) and size were checked (float32 too), else for half/bfloat16 its branches by
    one GEMM per row block and the element-wise kernel."""
    if isinstance(update, LokrUpdate):
        if not native.usable(out, source):
            return False
        w1, w2 = update.factors_w1_w2(out.device, workspace.cache)
        rows = w1.shape[0] * w2.shape[0]
        native.kron_add(out.view(rows, -1), source.view(rows, -1), w1 * value, w2.reshape(w2.shape[0], -1))
        return True
    if not isinstance(update, LohaUpdate) or not native.loha_usable(out, source):
        return False
    rows_out, rows_source = out.view(out.shape[0], -1), source.view(out.shape[0], -1)
    if _loha_fused_fits(update, rows_out, rows_source):
        _loha_fused_rows(rows_out, rows_source, update, 0, out.shape[0], value, workspace)
        return True
    if out.dtype == torch.float32:  # PyTorch's multiply-add is one pass already: the row path
        return False
    width = rows_out.shape[1]
    for chunk in rebuild.row_chunks(out.shape[0], width, budget=_chunk_elements(update, out.device)):
        branch1, branch2 = _loha_branch_rows(update, chunk.start, chunk.stop, width, out.device, workspace)
        native.hadamard_add(rows_out[chunk], rows_source[chunk], branch1, branch2, value)
    return True


def _same_dtype_one_op(out: Tensor, source: Tensor, update: LayerUpdate, value: float,
                       workspace: Workspace) -> bool:
    """A LoKr in one PyTorch multiply-add in the weight's own dtype, never building the Kronecker
    product: on the CPU, where w1 and w2 are exact in that dtype (full factors stored in it; a
    low-rank product is float32 and practically never exact below it, so not tried) and PyTorch
    multiply-adds half/bfloat16 in float32 (``rebuild.addcmul_rounds_once``)."""
    dtype = out.dtype
    if (not isinstance(update, LokrUpdate) or out.device.type != "cpu" or source.device != out.device
            or source.dtype != dtype or dtype not in (torch.float16, torch.bfloat16, torch.float32)
            or ((update.w1_low_rank or update.w2_low_rank) and dtype != torch.float32)
            or not rebuild.addcmul_rounds_once(dtype)):
        return False
    operands = _kron_operands(update, out.device, dtype, workspace.cache)
    if operands is None:
        return False
    rebuild.kron_add(out, source, *operands, value)
    return True


OnePass = Callable[[Tensor, Tensor, LayerUpdate, float, Workspace], bool]
ONE_PASS_STRATEGIES: list[OnePass] = [_native_one_pass, _same_dtype_one_op]


def one_pass(out: Tensor, source: Tensor, update: LayerUpdate, strength: float,
             workspace: Workspace | None = None) -> bool:
    """Strategy 1: patch a contiguous weight by one non-DoRA update in one pass over it, when a
    strategy of ``ONE_PASS_STRATEGIES`` fits. Returns False, writing nothing, when none does."""
    if strength == 0 or update.dora or not (out.is_contiguous() and source.is_contiguous()):
        return False
    workspace = workspace or Workspace()
    value = strength * update.scale
    return any(strategy(out, source, update, value, workspace) for strategy in ONE_PASS_STRATEGIES)


def patch_from_file(weight: Tensor, original: tuple[int, int], contributions: Sequence[Contribution],
                    check: bool, workspace: Workspace | None = None) -> bool | None:
    """Strategy 1 in place over a weight whose original is in a file (``original``: descriptor and
    offset), with reading the original folded into the same pass: each block is read from the file
    and patched while it is in cache (docs/architecture.md#originals-in-files). ``check`` (the first
    write, over the original itself): each block is compared with the file instead of read into
    the weight; True: equal, and patched; False: the weight differs from the file and is left
    exactly as it was. Without ``check`` (over patched values): True. None: no kernel does this for
    these contributions (a LoKr alone on a half/bfloat16 CPU weight does), nothing read or written."""
    contributions = [(update, strength) for update, strength in contributions if strength != 0]
    if len(contributions) != 1:
        return None
    update, strength = contributions[0]
    if (not isinstance(update, LokrUpdate) or update.dora or not weight.is_contiguous()
            or not native.usable(weight)):
        return None
    workspace = workspace or Workspace()
    update.check_shape(tuple(weight.shape))
    try:
        w1, w2 = update.factors_w1_w2(weight.device, workspace.cache)
        rows = w1.shape[0] * w2.shape[0]
        value = strength * update.scale
        return native.kron_add_from_file(weight.view(rows, -1), w1 * value, w2.reshape(w2.shape[0], -1), *original,
                                         check)
    finally:
        workspace.cache.clear()


# -- strategy 2: float32 row blocks ------------------------------------------------------------------
def _row_blocks(out: Tensor, source: Tensor, contributions: Sequence[Contribution], workspace: Workspace) -> None:
    rows_out, rows_source = out.view(out.shape[0], -1), source.view(out.shape[0], -1)
    height, width = rows_out.shape
    align = contributions[0][0].row_alignment
    budget = min(_chunk_elements(update, out.device) for update, _ in contributions)
    in_place_float = out.dtype == torch.float32
    for chunk in rebuild.row_chunks(height, width, align=align, budget=budget):
        if in_place_float:  # a float32 weight is its own work buffer
            work = rows_out[chunk]
            if out.data_ptr() != source.data_ptr():
                work.copy_(rows_source[chunk])
        else:
            work = workspace.buffer(out.device, (chunk.stop - chunk.start, width))
            work.copy_(rows_source[chunk])
        for update, strength in contributions:
            add_rows(work, chunk.start, chunk.stop, update, strength, workspace)
        if not in_place_float:
            rows_out[chunk].copy_(work)


def add_rows(work: Tensor, start: int, stop: int, update: LayerUpdate, strength: float,
             workspace: Workspace) -> Tensor:
    """Output rows ``start:stop`` of a weight, given as ``work`` (float32 ``(rows, I·k…)``), patched in
    place by one update: ``work += μ·s·R[rows]``, or with output-axis DoRA
    ``work ← work + μ·(DoRA(work + s·R) − work)``."""
    if strength == 0:
        return work
    if not update.dora:
        value = strength * update.scale
        if isinstance(update, LokrUpdate) and _within_kron_blocks(update, start, stop):
            w1_operand, w2_operand = _kron_operands(update, work.device, torch.float32, workspace.cache)
            return rebuild.kron_add_rows(work, start, stop, w1_operand, w2_operand, value)
        if isinstance(update, LohaUpdate):
            if _loha_fused_fits(update, work):
                _loha_fused_rows(work, work, update, start, stop, value, workspace)
                return work
            branch1, branch2 = _loha_branch_rows(update, start, stop, work.shape[1], work.device, workspace)
            return work.addcmul_(branch1, branch2, value=value)
        product = update.rows(start, stop, work.device, workspace.cache)
        return work.add_(product) if value == 1.0 else work.add_(product, alpha=value)
    merged = update.rows(start, stop, work.device, workspace.cache)
    if update.scale != 1.0:
        merged.mul_(update.scale)
    merged.add_(work)
    magnitude = update.dora_scale.reshape(-1)[start:stop].to(device=work.device, dtype=torch.float32)
    rebuild.apply_dora(merged, magnitude, "out")
    if strength == 1:
        return work.copy_(merged)
    return work.add_(merged.sub_(work), alpha=strength)


# -- strategy 3: the whole layer ---------------------------------------------------------------------
def _whole_layer(out: Tensor, source: Tensor, contributions: Sequence[Contribution], workspace: Workspace) -> None:
    work = source.to(device=out.device, dtype=torch.float32, copy=True)
    shape = tuple(work.shape)
    for update, strength in contributions:
        if works_by_rows(update, shape):
            patch(work, work, [(update, strength)], workspace)
            continue
        merged = delta(update, shape, work.device, workspace.cache)
        merged.add_(work)
        magnitude = update.dora_scale.to(device=work.device, dtype=torch.float32)
        rebuild.apply_dora(merged, magnitude, update.dora_axis(shape))
        if strength == 1:
            work.copy_(merged)
        else:
            work.add_(merged.sub_(work), alpha=strength)
    out.copy_(work)


# -- updates of some rows of a layer -----------------------------------------------------------------
def _placed_rows(out: Tensor, source: Tensor, contributions: Sequence[Contribution], workspace: Workspace) -> None:
    """Contributions of which some patch only rows of the layer (``PlacedUpdate``). Placed updates
    on rows no other contribution touches (a fused qkv patched by a file's to_q, to_k and to_v)
    patch their rows view directly, each by the best strategy for it; otherwise every contribution
    is applied in order to a float32 copy of the layer, cast once (the bits of the row-block path)."""
    height = out.shape[0]
    spans = sorted((update.start, update.stop) if isinstance(update, PlacedUpdate) else (0, height)
                   for update, _ in contributions)
    apart = all(isinstance(update, PlacedUpdate) for update, _ in contributions) and all(
        previous[1] <= following[0] for previous, following in zip(spans, spans[1:], strict=False))
    if apart:
        if out.data_ptr() != source.data_ptr():
            edges = [0, *(edge for span in spans for edge in span), height]
            for lo, hi in zip(edges[::2], edges[1::2], strict=True):  # the rows between placed spans
                if lo < hi:
                    out[lo:hi].copy_(source[lo:hi])
        for update, strength in contributions:
            rows = slice(update.start, update.stop)
            patch(out[rows], source[rows], [(update.inner, strength)], workspace)
        return
    work = source.to(device=out.device, dtype=torch.float32, copy=True)
    for update, strength in contributions:
        if isinstance(update, PlacedUpdate):
            rows = work[update.start:update.stop]
            patch(rows, rows, [(update.inner, strength)], workspace)
        else:
            patch(work, work, [(update, strength)], workspace)
    out.copy_(work)


# -- conveniences --------------------------------------------------------------------------------------
@torch.no_grad()
def delta(update: LayerUpdate, weight_shape: tuple[int, ...], device=None, cache: FactorCache | None = None) -> Tensor:
    """``s·R`` reshaped to ``weight_shape``, float32 on ``device``; strength not included. For hosts
    that add a ΔW themselves (ComfyUI's offset patches) and for inspection."""
    update.check_shape(tuple(weight_shape))
    product = update.rows(0, update.out_features, device, cache).reshape(weight_shape)
    if update.scale != 1.0:
        product.mul_(update.scale)
    return product


@torch.no_grad()
def patched_weight(update: LayerUpdate, base: Tensor, strength: float = 1.0, device=None) -> Tensor:
    """A new tensor: ``base`` patched by ``update`` at ``strength``, in float32, cast once to
    ``base.dtype``."""
    work = base.to(device=device or base.device, dtype=torch.float32, copy=True)
    patch(work, work, [(update, strength)])
    return work.to(base.dtype)


def write_bias(layer: nn.Module, original: Tensor, contributions: Sequence[Contribution], in_place: bool) -> None:
    """The layer's bias: ``original + Σ μ·s·diff_b`` over the updates that carry one (float32, cast
    once), or the original itself when none does. New storage unless ``in_place`` or the live bias
    is already patched (no longer the original)."""
    bias = layer.bias
    work = patched_bias(original, contributions, bias.device)
    if work is None:
        restore(bias, original)
        return
    with torch.no_grad():
        if not in_place and shares_memory(bias, original):
            bias.data = work.to(bias.dtype)
        else:
            bias.copy_(work)


@torch.no_grad()
def patched_bias(original: Tensor, contributions: Sequence[Contribution], device=None) -> Tensor | None:
    """``original + Σ μ·s·diff_b`` in float32 on ``device`` (cast it once), or ``None`` when no
    update carries a bias delta at a non-zero strength."""
    deltas = [(update, strength) for update, strength in contributions if update.has_bias_delta and strength != 0]
    if not deltas:
        return None
    device = original.device if device is None else device
    work = original.to(device=device, dtype=torch.float32, copy=True)
    for update, strength in deltas:
        work.add_(update.bias_delta(device), alpha=strength)
    return work


def shares_memory(live: Tensor, original: Tensor) -> bool:
    """True when a live tensor still is its kept original (same memory)."""
    return live.device == original.device and live.data_ptr() == original.data_ptr()


def restore(param: Tensor, original: Tensor) -> None:
    """Put the original values back: by swapping the storage in when it fits the parameter as it is
    now (no copy, bit-identical), else by copying (the model moved or changed dtype since)."""
    if shares_memory(param, original):
        return
    if (original.device, original.dtype, original.shape, original.stride()) == (
            param.device, param.dtype, param.shape, param.stride()):
        param.data = original
    else:
        with torch.no_grad():
            param.copy_(original)


# -- per-algorithm pieces ----------------------------------------------------------------------------
def _chunk_elements(update: LayerUpdate, device: torch.device) -> int:
    """About how many elements one row block should hold for ``update`` on ``device``."""
    if device.type == "cuda":
        return rebuild.GPU_CHUNK_ELEMENTS
    if isinstance(update, LokrUpdate) and not update.dora:
        return rebuild.BROADCAST_CHUNK_ELEMENTS
    return rebuild.CHUNK_ELEMENTS


def _within_kron_blocks(update: LokrUpdate, start: int, stop: int) -> bool:
    """True when rows ``start:stop`` are whole w2 blocks or lie in one: one broadcast multiply-add."""
    block = update.w2_shape[0]
    return (start % block == 0 and stop % block == 0) or start // block == (stop - 1) // block


def _kron_operands(update: LokrUpdate, device, dtype: torch.dtype, cache: FactorCache | None
                   ) -> tuple[Tensor, Tensor] | None:
    """``rebuild.kron_operands`` of w1 and w2 in ``dtype``, or ``None`` if either factor would lose
    bits in ``dtype``."""
    def build() -> tuple[Tensor, ...]:
        stored = update.factors.get("lokr_w1"), update.factors.get("lokr_w2")
        if dtype != torch.float32 and all(t is not None and t.dtype == dtype for t in stored):
            # Both factors stored full in the weight's dtype: exact there as they are; no float32
            # round trip (about a tenth of a full-w2 LoKr's in-place patch).
            w1, w2 = (t.to(device) for t in stored)
            return rebuild.kron_operands(w1.reshape(update.w1_shape), w2.reshape(w2.shape[0], -1))
        w1, w2 = update.factors_w1_w2(device, cache)
        w2 = w2.reshape(w2.shape[0], -1)
        if dtype != torch.float32:
            w1, w2 = rebuild.exactly_in(w1, dtype), rebuild.exactly_in(w2, dtype)
            if w1 is None or w2 is None:
                return ()
        return rebuild.kron_operands(w1, w2)

    return cached(cache, update, f"kron operands {dtype}", device, build) or None


def _loha_fused_fits(update: LohaUpdate, rows: Tensor, *others: Tensor) -> bool:
    """True when the fused native kernel may patch ``rows`` (a 2-D block of the weight, ``others``
    read beside it): usable here, and checked for this dtype, rank and size."""
    return native.loha_usable(rows, *others) and native.loha_fused(rows.dtype, *rows.shape, update.gemm_inner)


def _loha_fused_rows(out: Tensor, source: Tensor, update: LohaUpdate, start: int, stop: int, value: float,
                     workspace: Workspace) -> None:
    """``out = source + value·(branch1 ⊙ branch2)[start:stop]`` by the fused kernel; ``out`` and
    ``source`` are those rows. Its packed factors go to buffer slot 1."""
    outs, ins = update.stacked_factors(out.device, workspace.cache)
    rows = outs[:, :, start:stop].transpose(1, 2) if update.tucker else outs[:, start:stop]
    packed = workspace.buffer(out.device, (1, native.packed_size(ins.shape[1], out.shape[1])), slot=1)
    native.loha_add(out, source, rows, ins, value, packed.view(-1))


def _loha_branch_rows(update: LohaUpdate, start: int, stop: int, width: int, device,
                      workspace: Workspace) -> tuple[Tensor, Tensor]:
    """Rows ``start:stop`` of both Hadamard branches by one batched GEMM into buffer slot 1."""
    outs, ins = update.stacked_factors(device, workspace.cache)
    both = workspace.buffer(device, (2 * (stop - start), width), slot=1).view(2, stop - start, -1)
    return rebuild.loha_branches_rows(outs, ins, start, stop, update.tucker, out=both)
