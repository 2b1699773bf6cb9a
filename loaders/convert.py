"""Exact LoRA factors of a module's update: ``s·R = up @ down``, with no SVD (docs/format.md#factor-shapes).

A LoHa update is ``(A1 B1) ⊙ (A2 B2)``. Entry by entry, ``Σ_i A1[o,i] B1[i,q] · Σ_j A2[o,j] B2[j,q]``
is one sum over index pairs ``(i, j)``, so the update is exactly ``U @ V`` with the row-wise
Khatri–Rao product ``U[o, (i,j)] = A1[o,i]·A2[o,j]`` and the column-wise one
``V[(i,j), q] = B1[i,q]·B2[j,q]``: rank ``r1·r2``. A Tucker branch is ``A Hᵀ``-shaped too (the output
factor times the core contracted with the input factor), so the same holds for convs.

A LoKr update is ``w1 ⊗ w2``. With ``w1 = a1 b1`` and ``w2 = a2 b2`` (a full factor is itself times
an identity, whichever side is smaller), ``(a1 b1) ⊗ (a2 b2) = (a1 ⊗ a2)(b1 ⊗ b2)``: rank
``rank(w1)·rank(w2)``. A conv's kernel stays with w2's input factor, so ``down`` holds the kernel and
``up`` is a 1×1 conv: a LoCon.

A LoRA/LoCon is its own factors, its Tucker ``lora_mid`` folded into ``down``; a full diff is
itself times an identity. DoRA rescales by the patched weight's norms, which no fixed ``up @ down``
reproduces: ``exact_lora`` refuses it.

``to_lora`` chooses per module: exact where the exact rank fits, else a truncated SVD of ΔW at a
given rank or error, the error always reported. Writing files and the command line come next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import rebuild
from .errors import LohakrError, where
from .updates import DiffUpdate, LayerUpdate, LohaUpdate, LokrUpdate, LoraUpdate


@dataclass
class LoraFactors:
    """``up @ down`` is the module's scaled update ``s·R`` (strength not included), in float32:
    ``up`` ``(O, R)``, ``down`` ``(R, I·k…)`` (a conv's kernel folded in, as the layer's weight is
    folded; a file writer reshapes it to ``(R, I, k…)`` for a LoCon)."""

    up: Tensor
    down: Tensor

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def delta(self, weight_shape: tuple[int, ...]) -> Tensor:
        """The update these factors give, reshaped to ``weight_shape``."""
        return (self.up @ self.down).reshape(weight_shape)


def exact_rank(update: LayerUpdate) -> int:
    """The rank of ``exact_lora(update)``, from shapes alone (what a conversion would store)."""
    if isinstance(update, LohaUpdate):
        inner = update.gemm_inner
        return inner * int(update.factors["hada_t2"].shape[0] if update.tucker else update.rank)
    if isinstance(update, LokrUpdate):
        return _lokr_side_rank(update, "1") * _lokr_side_rank(update, "2")
    if isinstance(update, LoraUpdate):
        return update.rank
    shape = update.weight_shape
    return min(shape[0], _width(shape))


@torch.no_grad()
def exact_lora(update: LayerUpdate, device=None) -> LoraFactors:
    """Factors ``up``, ``down`` with ``up @ down = s·R`` exactly (up to float32 rounding), built
    from the module's factors without forming R. Refuses DoRA modules (``LohakrError``)."""
    if update.dora:
        raise LohakrError(f"{where(update.source, update.name)}DoRA rescales by the patched weight's norms; "
                          "no LoRA reproduces it exactly")
    if isinstance(update, LohaUpdate):
        up, down = _loha(update, device)
    elif isinstance(update, LokrUpdate):
        up, down = _lokr(update, device)
    elif isinstance(update, LoraUpdate):
        up, down = _lora(update, device)
    elif isinstance(update, DiffUpdate):
        up, down = _full(update, device)
    else:  # pragma: no cover - every algorithm lohakr applies is above
        raise LohakrError(f"{where(update.source, update.name)}no exact LoRA form for {update.kind}")
    if update.scale != 1.0:
        up = up * update.scale
    return LoraFactors(up.contiguous(), down.contiguous())


def _width(shape: tuple[int, ...]) -> int:
    width = 1
    for d in shape[1:]:
        width *= d
    return width


def _khatri_rao_rows(a1: Tensor, a2: Tensor) -> Tensor:
    """``U[o, (i, j)] = a1[o, i]·a2[o, j]``: ``(O, r1·r2)``."""
    return (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(a1.shape[0], -1)


def _khatri_rao_columns(b1: Tensor, b2: Tensor) -> Tensor:
    """``V[(i, j), q] = b1[i, q]·b2[j, q]``: ``(r1·r2, Q)``."""
    return (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(-1, b1.shape[1])


def _loha(update: LohaUpdate, device) -> tuple[Tensor, Tensor]:
    outs, ins = update.stacked_factors(device)  # (2, O, r) / Tucker (2, r, O); (2, r, I·k…)
    if update.tucker:
        outs = outs.transpose(1, 2)
    return _khatri_rao_rows(outs[0], outs[1]), _khatri_rao_columns(ins[0], ins[1])


def _lokr_side_rank(update: LokrUpdate, side: str) -> int:
    f = update.factors
    if f"lokr_w{side}" in f:
        rows, columns = (update.w1_shape if side == "1" else (update.w2_shape[0], _width(update.w2_shape)))
        return min(rows, columns)
    return int(f[f"lokr_w{side}_b"].shape[0])


def _lokr_side(update: LokrUpdate, side: str, device) -> tuple[Tensor, Tensor]:
    """One Kronecker factor as ``a @ b`` (float32): its stored low-rank pair, a Tucker rebuild's
    output factor and half, or a full factor times an identity on its smaller side."""
    f = update.factors

    def stored(key: str) -> Tensor:
        return update.float_factor(key, device)

    if f"lokr_w{side}" in f:
        full = stored(f"lokr_w{side}")
        full = full.reshape(full.shape[0], -1)
        rows, columns = full.shape
        if rows <= columns:
            return torch.eye(rows, dtype=full.dtype, device=full.device), full
        return full, torch.eye(columns, dtype=full.dtype, device=full.device)
    a, b = stored(f"lokr_w{side}_a"), rebuild.flatten_factor(stored(f"lokr_w{side}_b"))
    if side == "2" and update.tucker:
        half = rebuild.tucker_inner(stored("lokr_t2"), b)
        return a.t(), half.reshape(half.shape[0], -1)
    return rebuild.flatten_factor(a), b


def _lokr(update: LokrUpdate, device) -> tuple[Tensor, Tensor]:
    a1, b1 = _lokr_side(update, "1", device)
    a2, b2 = _lokr_side(update, "2", device)
    return torch.kron(a1.contiguous(), a2.contiguous()), torch.kron(b1.contiguous(), b2.contiguous())


def _lora(update: LoraUpdate, device) -> tuple[Tensor, Tensor]:
    def stored(key: str) -> Tensor | None:
        return update.float_factor(key, device)

    up, down = rebuild.flatten_factor(stored("lora_up.weight")), rebuild.flatten_factor(stored("lora_down.weight"))
    mid = stored("lora_mid.weight")
    if mid is None:
        return up, down
    half = rebuild.tucker_inner(mid, down)  # (r, I, k…): the core contracted with the input factor
    return up, half.reshape(half.shape[0], -1)


def _full(update: DiffUpdate, device) -> tuple[Tensor, Tensor]:
    diff = update.float_factor("diff", device)
    diff = diff.reshape(diff.shape[0], -1)
    rows, columns = diff.shape
    if rows <= columns:
        return torch.eye(rows, dtype=diff.dtype, device=diff.device), diff
    return diff, torch.eye(columns, dtype=diff.dtype, device=diff.device)


@dataclass
class Conversion:
    """One module as a LoRA: its factors, how they were found, and how far they are from ΔW
    (relative Frobenius error, 0 for an exact conversion up to float32 rounding)."""

    factors: LoraFactors
    method: str  # "exact" or "svd"
    error: float

    @property
    def rank(self) -> int:
        return self.factors.rank


@torch.no_grad()
def to_lora(update: LayerUpdate, rank: int | str = "exact", max_error: float | None = None,
            device=None) -> Conversion:
    """``update`` as a LoRA. Exact (``exact_lora``) when ``rank`` is ``"exact"`` or at least the exact
    rank; otherwise a truncated SVD of ΔW in float32, one layer at a time: at ``rank``, or with
    ``max_error`` at the smallest rank whose relative Frobenius error is at most that (never above
    ``rank`` when both are given). DoRA modules are refused (``exact_lora``)."""
    if rank != "exact" and (not isinstance(rank, int) or rank < 1):
        raise LohakrError(f"rank is {rank!r}; a rank is a positive integer or 'exact'")
    if max_error is not None and not 0 <= max_error < 1:
        raise LohakrError(f"max_error is {max_error!r}; a relative error lies in [0, 1)")
    exact = exact_rank(update)
    if rank == "exact" or (max_error is None and rank >= exact):
        return Conversion(exact_lora(update, device), "exact", 0.0)
    if update.dora:
        exact_lora(update)  # raises, naming the module
    shape = update.weight_shape
    delta = update.delta(shape, device).reshape(shape[0], -1)
    u, singular, vh = torch.linalg.svd(delta, full_matrices=False)
    energy = singular.double().square()
    total = float(energy.sum())
    # error(k) = sqrt(Σ_{i ≥ k} σ_i²) / ‖ΔW‖: the tail left out at rank k
    tails = (energy.flip(0).cumsum(0).flip(0).sqrt() / max(total, 1e-300) ** 0.5).tolist() + [0.0]
    keep = len(singular) if rank == "exact" else min(rank, len(singular))
    if max_error is not None:
        keep = min(keep, next(k for k, tail in enumerate(tails) if tail <= max_error))
    keep = max(keep, 1)
    up = u[:, :keep] * singular[:keep]
    return Conversion(LoraFactors(up.contiguous(), vh[:keep].contiguous()), "svd", tails[keep] if total else 0.0)
