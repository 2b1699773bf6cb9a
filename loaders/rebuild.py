"""Pure math: rebuild the unscaled update R of each algorithm from its factors (docs/format.md#factor-shapes).

Every function takes float32 tensors already on the compute device and returns a new tensor.
Nothing here knows about files, names, alpha or strength: the scale is applied by the caller
(``LayerUpdate.scale``), once. Kernel dimensions are generic (``...``), so Conv1d/2d/3d all work.

Factor convention, kept from the file format: ``_a`` is the output side, ``_b`` the input side.
In Tucker mode the output factor is stored transposed, ``(r, out)``; see ``rebuild_tucker``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def flatten_factor(factor: Tensor) -> Tensor:
    """``(r, I, kh, kw)`` or ``(O, r, 1, 1)`` → 2-D, keeping the first axis (row-major fold)."""
    return factor.reshape(factor.shape[0], -1)


def rebuild_tucker(core: Tensor, out_factor: Tensor, in_factor: Tensor) -> Tensor:
    """Tucker rebuild ``T[p, q, ...] = Σ_ij out[i, p] · core[i, j, ...] · in[j, q]``.

    ``core`` is ``(r1, r2, *kernel)``, ``out_factor`` ``(r1, P)``, ``in_factor`` ``(r2, Q)``;
    the result is ``(P, Q, *kernel)``. The core's first index pairs with the output factor.
    """
    return tucker_outer(tucker_inner(core, in_factor), out_factor)


def tucker_inner(core: Tensor, in_factor: Tensor) -> Tensor:
    """The core contracted with the input factor, ``(r1, Q, *kernel)``: shared by every output row."""
    return torch.einsum("i j ..., j q -> i q ...", core, in_factor)


def tucker_outer(half: Tensor, out_factor: Tensor) -> Tensor:
    """``tucker_inner``'s result contracted with (columns of) the output factor: ``(P, Q, *kernel)``."""
    return torch.einsum("i q ..., i p -> p q ...", half, out_factor)


# Elements of ΔW built per step on a CPU: the Hadamard product needs each branch only one block
# at a time, so building a layer holds that layer plus two blocks, not three full-size products;
# a 4 MiB float32 block stays in cache between the GEMM that writes it and the multiply-add that
# reads it, while being tall enough for an efficient rank-32 GEMM (smaller and larger blocks were
# both slower on full SDXL; benchmarks/README.md).
CHUNK_ELEMENTS = 1 << 20
# Row blocks that need no GEMM (LoKr's broadcast multiply-add) are best larger: fewer steps.
BROADCAST_CHUNK_ELEMENTS = 1 << 21
# On a GPU, kernel launches cost more than memory: build a layer in one block up to this size.
GPU_CHUNK_ELEMENTS = 1 << 27


def row_chunks(rows: int, row_size: int, start: int = 0, align: int = 1, budget: int | None = None) -> list[slice]:
    """Slices of ``rows`` (from ``start``) holding about ``budget`` (default ``CHUNK_ELEMENTS``)
    elements each. With ``align`` (LoKr: the rows of one w2 block) no slice straddles two blocks:
    slices are whole blocks where a block fits the budget, else equal parts of one block."""
    step = max(1, (budget or CHUNK_ELEMENTS) // max(1, row_size))
    if align <= 1:
        return [slice(p, min(p + step, rows)) for p in range(start, rows, step)]
    if step >= align:
        step -= step % align
        first = min(rows, start + (-start) % align)  # an unaligned start runs to the next block first
        edges = [start, *range(first, rows, step), rows]
    else:
        parts = -(-align // step)
        cuts = (block + j * align // parts for block in range(start - start % align, rows, align)
                for j in range(parts))
        edges = [start, *(cut for cut in cuts if start < cut < rows), rows]
    return [slice(p, q) for p, q in zip(edges, edges[1:], strict=False) if q > p]


def loha_branches_rows(outs: Tensor, ins: Tensor, start: int, stop: int, tucker: bool,
                       out: Tensor | None = None) -> Tensor:
    """Output rows ``start:stop`` of both Hadamard branches at once, ``(2, rows, I·k…)``, by one
    batched GEMM (faster than two ``torch.mm`` calls for rank-32 row blocks on a CPU).
    ``outs``: both output factors stacked, ``(2, O, r)``, or in Tucker mode ``(2, r, O)``;
    ``ins``: both input factors (Tucker: both halves) stacked, ``(2, r, I·k…)``."""
    rows = outs[:, :, start:stop].transpose(1, 2) if tucker else outs[:, start:stop]
    return torch.bmm(rows, ins, out=out)


def loha_product(
    w1_a: Tensor,
    w1_b: Tensor,
    w2_a: Tensor,
    w2_b: Tensor,
    t1: Tensor | None = None,
    t2: Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Tensor:
    """LoHa: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, or the Hadamard product of two Tucker rebuilds.

    Without Tucker ``_a`` is ``(O, r)``; with Tucker ``_a`` is ``(r, O)``, ``_b`` ``(r, I)``.
    Returns output rows ``start:stop`` flattened to 2-D ``(rows, I·k…)``, built in row chunks so
    each branch only ever exists one chunk at a time.
    """
    tucker = t1 is not None
    out_dim = w1_a.shape[1] if tucker else w1_a.shape[0]
    stop = out_dim if stop is None else stop
    if tucker:
        ins = [tucker_inner(t1, w1_b), tucker_inner(t2, w2_b)]
        ins = torch.stack([h.reshape(h.shape[0], -1) for h in ins])
    else:
        ins = torch.stack([flatten_factor(w1_b), flatten_factor(w2_b)])
    outs = torch.stack([w1_a, w2_a] if tucker else [flatten_factor(w1_a), flatten_factor(w2_a)])
    width = ins.shape[2]
    out = torch.empty(stop - start, width, dtype=w1_b.dtype, device=w1_b.device)
    chunks = row_chunks(stop, width, start)
    both = torch.empty(2, chunks[0].stop - chunks[0].start if chunks else 0, width, dtype=out.dtype, device=out.device)
    for rows in chunks:
        branch1, branch2 = loha_branches_rows(outs, ins, rows.start, rows.stop, tucker,
                                              out=both[:, : rows.stop - rows.start])
        torch.mul(branch1, branch2, out=out[rows.start - start: rows.stop - start])
    return out


def kron(w1: Tensor, w2: Tensor) -> Tensor:
    """Kronecker product with w1 as the outer (block) factor.

    w1 gets *trailing* singleton axes up to w2's rank first: ``torch.kron`` would pad the
    smaller operand with leading ones and give ``(b, d, a·kh, c·kw)`` for a 4-D w2 (docs/format.md#tv-kron-pad).
    """
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1.contiguous(), w2.contiguous())


def kron_rows(w1: Tensor, w2: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of ``kron(w1, w2)``, flattened to 2-D, without building the rest.

    Row ``i·b + q`` (b = rows of w2) is ``w1[i] ⊗ w2[q]``: each w1 row contributes one block."""
    b = w2.shape[0]
    if start % b == 0 and stop % b == 0:  # whole blocks: one kron
        return kron(w1[start // b: stop // b], w2).reshape(stop - start, -1)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    pieces = []
    for i in range(start // b, (stop - 1) // b + 1):
        q0, q1 = max(start - i * b, 0), min(stop - i * b, b)
        pieces.append(torch.kron(w1[i:i + 1].contiguous(), w2[q0:q1].contiguous()).reshape(q1 - q0, -1))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# Below this many contiguous elements per w2 row, a Kronecker multiply-add runs on tiled operands
# (runs of several w2 rows side by side) instead of w2's own short rows: a CPU's vector loop then
# runs long enough to pay off; from about 256 on, the plain broadcast is as fast and reads less.
KRON_SHORT_RUN = 256


def kron_operands(w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """w1 ``(a, c)`` and w2 ``(b, k)`` (``k = d·kernel``) as two 4-D operands whose broadcast
    product, viewed ``(a, b, c/g, g·k)``, is ``w1 ⊗ w2``: ``(a,1,c,1)·(1,b,1,k)`` (g = 1), or for
    short w2 rows ``(a,1,c/g,g·k)·(1,b,1,g·k)`` with w1's entries repeated k times and w2 tiled g
    times, g the smallest divisor of c that makes runs of at least ``KRON_SHORT_RUN``. Either way
    each element is the same product ``w1[i,j]·w2[p,q]``, so the same bits."""
    (a, c), (b, k) = w1.shape, w2.shape
    if k >= KRON_SHORT_RUN or c == 1:
        return w1.reshape(a, 1, c, 1), w2.reshape(1, b, 1, k)
    g = next((g for g in range(2, c) if c % g == 0 and g * k >= KRON_SHORT_RUN), c)
    # The smallest g, not c: w2 tiled c times is 1/a of the weight, built on every strength change.
    # expand + reshape: one copy each, faster than repeat_interleave / repeat.
    return (w1.reshape(a, c // g, g, 1).expand(a, c // g, g, k).reshape(a, 1, c // g, g * k),
            w2.unsqueeze(1).expand(b, g, k).reshape(1, b, 1, g * k))


def _kron_view(t: Tensor, w1_operand: Tensor, w2_operand: Tensor) -> Tensor:
    return t.view(w1_operand.shape[0], w2_operand.shape[1], w1_operand.shape[2], w2_operand.shape[3])


def kron_add(out: Tensor, source: Tensor, w1_operand: Tensor, w2_operand: Tensor, value: float) -> Tensor:
    """``out = source + value·(w1 ⊗ w2)`` for a whole weight in one multiply-add, from
    ``kron_operands``, without materialising the Kronecker product. ``out`` may be ``source``."""
    torch.addcmul(_kron_view(source, w1_operand, w2_operand), w1_operand, w2_operand, value=value,
                  out=_kron_view(out, w1_operand, w2_operand))
    return out


def kron_add_rows(work: Tensor, start: int, stop: int, w1_operand: Tensor, w2_operand: Tensor,
                  value: float) -> Tensor:
    """``work += value·(w1 ⊗ w2)[start:stop]`` in place (``work``: those rows), from
    ``kron_operands``, when the rows are whole w2 blocks or lie within one block: the rows of
    ``kron_add``, bit for bit (the same multiply-add on the same operands)."""
    block = w2_operand.shape[1]
    first, last = start // block, (stop - 1) // block + 1
    if start % block == 0 and stop % block == 0:
        w1_operand = w1_operand[first:last]
    elif last - first == 1:
        w1_operand = w1_operand[first:first + 1]
        w2_operand = w2_operand[:, start - first * block: stop - first * block]
    else:
        raise ValueError(f"rows {start}:{stop} span Kronecker blocks of {block} rows partially")
    _kron_view(work, w1_operand, w2_operand).addcmul_(w1_operand, w2_operand, value=value)
    return work


@functools.cache
def addcmul_rounds_once(dtype: torch.dtype) -> bool:
    """Whether ``kron_add`` on CPU tensors of ``dtype`` gives exactly what the float32 path gives
    (cast up, multiply-add in float32, cast down once). PyTorch computes half and bfloat16
    multiply-adds in float32; this checks it once per process, for both operand layouts and with
    vector tails, so a PyTorch that did otherwise only loses speed, never bits."""
    if dtype == torch.float32:
        return True
    g = torch.Generator().manual_seed(0)
    value = 0.7310585786300049
    for run in (37, KRON_SHORT_RUN + 3):
        w1 = (torch.randn(3, 4, generator=g) * 0.1).to(dtype)
        w2 = (torch.randn(5, run, generator=g) * 0.05).to(dtype)
        source = (torch.randn(15, 4 * run, generator=g) * 0.02).to(dtype)
        fast = kron_add(torch.empty_like(source), source, *kron_operands(w1, w2), value)
        exact = kron_add(source.float(), source.float(), *kron_operands(w1.float(), w2.float()), value).to(dtype)
        if not torch.equal(fast, exact):
            return False
    return True


def exactly_in(t: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``t`` cast to ``dtype`` if that loses nothing (every value survives the round trip), else ``None``."""
    low = t.to(dtype)
    return low if torch.equal(low.to(t.dtype), t) else None


def lokr_w1(w1: Tensor | None, w1_a: Tensor | None, w1_b: Tensor | None) -> Tensor:
    """The small LoKr factor ``(a, c)``: stored full, or ``w1_a @ w1_b``."""
    if w1 is not None:
        return w1
    return w1_a @ flatten_factor(w1_b)


def lokr_w2(
    w2: Tensor | None, w2_a: Tensor | None, w2_b: Tensor | None, t2: Tensor | None
) -> Tensor:
    """The large LoKr factor: full ``(b, d[, *k])``, Tucker ``(b, d, *k)`` or flat ``(b, d·k…)``."""
    if w2 is not None:
        return w2
    if t2 is not None:
        return rebuild_tucker(t2, w2_a, w2_b)
    return w2_a @ flatten_factor(w2_b)


def lora_product(up: Tensor, down: Tensor, mid: Tensor | None = None, start: int = 0,
                 stop: int | None = None) -> Tensor:
    """LoRA/LoCon: rows ``start:stop`` of ``up @ down`` (2-D, ``(rows, I·k…)``), or of the Tucker
    rebuild with ``lora_mid``."""
    up2 = flatten_factor(up)[start:stop]
    if mid is None:
        return up2 @ flatten_factor(down)
    rows = rebuild_tucker(mid, up2.t(), flatten_factor(down))
    return rows.reshape(rows.shape[0], -1)


def apply_dora(merged: Tensor, magnitude: Tensor, axis: str) -> Tensor:
    """DoRA: rescale ``merged = W0 + s·R`` so its norm along ``axis`` equals ``magnitude``.

    ``W' = merged · m / (‖merged‖ + eps)``, eps = float32 machine epsilon as LyCORIS and ComfyUI use.
    Works in place on ``merged`` and returns it.
    """
    eps = torch.finfo(torch.float32).eps
    out_dim = merged.shape[0]
    trailing = [1] * (merged.dim() - 1)
    if axis == "out":
        norm = merged.reshape(out_dim, -1).norm(dim=1).reshape(out_dim, *trailing)
        m = magnitude.reshape(out_dim, *trailing)
    else:
        in_dim = merged.shape[1]
        norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1)
        norm = norm.reshape(1, in_dim, *trailing[1:])
        m = magnitude.reshape(1, in_dim, *trailing[1:])
    norm.add_(eps)
    return merged.mul_(m / norm)
