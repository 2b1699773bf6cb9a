"""Exact LoRA factors of a module's update: ``s·R = up @ down``, with no SVD (docs/format.md#conversion-to-lora).

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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from . import rebuild
from .errors import LohakrError, where
from .families import FAMILIES
from .updates import DiffUpdate, LayerUpdate, LohaUpdate, LokrUpdate, LoraUpdate, RowsOfUpdate


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
    if isinstance(update, RowsOfUpdate):
        return exact_rank(update.inner)
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
    if isinstance(update, RowsOfUpdate):  # rows placed or reordered on a layer: the inner factors, up moved
        inner = exact_lora(update.inner, device)
        up = inner.up.new_zeros(update.out_features, inner.rank)
        for src, dst, n in update.moves():
            up[dst:dst + n] = inner.up[src:src + n]
        return LoraFactors(up, inner.down)
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


def _svd(update: LayerUpdate, device) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ``s·R``. From the exact factors when their rank is below the layer's: QR of
    each, then the SVD of an R×R core (O·R² work, not O·I·min(O, I)); else of ΔW itself."""
    shape = update.weight_shape
    if exact_rank(update) < min(shape[0], _width(shape)):
        return _svd_of_factors(exact_lora(update, device), shape)
    delta = update.delta(shape, device).reshape(shape[0], -1)
    return torch.linalg.svd(delta, full_matrices=False)


def _width(shape: tuple[int, ...]) -> int:
    """The folded input width of a weight shape ``(O, I, k…)``."""
    return math.prod(shape[1:])


def _times_identity(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """A full matrix as ``a @ b`` of the smallest rank without a decomposition: an identity on its
    smaller side."""
    rows, columns = matrix.shape
    if rows <= columns:
        return torch.eye(rows, dtype=matrix.dtype, device=matrix.device), matrix
    return matrix, torch.eye(columns, dtype=matrix.dtype, device=matrix.device)


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
        return _times_identity(full.reshape(full.shape[0], -1))
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
    return _times_identity(diff.reshape(diff.shape[0], -1))


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
    """``update`` as a LoRA. Without ``max_error``: exact (``exact_lora``) when ``rank`` is ``"exact"``
    or at least the exact rank, else a truncated SVD of ΔW in float32 at ``rank``. With ``max_error``:
    the SVD at the smallest rank whose relative Frobenius error is at most that (never above ``rank``
    when one is given). DoRA modules are refused (``exact_lora``)."""
    if rank != "exact" and (not isinstance(rank, int) or rank < 1):
        raise LohakrError(f"rank is {rank!r}; a rank is a positive integer or 'exact'")
    if max_error is not None and not 0 <= max_error < 1:
        raise LohakrError(f"max_error is {max_error!r}; a relative error lies in [0, 1)")
    exact = exact_rank(update)
    if max_error is None and (rank == "exact" or rank >= exact):
        return Conversion(exact_lora(update, device), "exact", 0.0)
    if update.dora:
        exact_lora(update)  # raises, naming the module
    return _truncated(*_svd(update, device), rank, max_error)


def _truncated(u: Tensor, singular: Tensor, vh: Tensor, rank: int | str, max_error: float | None) -> Conversion:
    """An SVD cut at ``rank``, or at the smallest rank whose relative error is at most ``max_error``."""
    energy = singular.double().square()
    total = float(energy.sum())
    # error(k) = sqrt(Σ_{i ≥ k} σ_i²) / ‖ΔW‖: the tail left out at rank k
    tails = (energy.flip(0).cumsum(0).flip(0).sqrt() / max(total, 1e-300) ** 0.5).tolist() + [0.0]
    keep = len(singular) if rank == "exact" else min(rank, len(singular))
    if max_error is not None:
        keep = min(keep, next(k for k, tail in enumerate(tails) if tail <= max_error))
    keep = max(keep, 1)
    # Each factor takes the square root of the singular values: both then have ΔW's magnitude's
    # square root, which fp16/bf16 hold where a small ΔW in one factor would underflow.
    root = singular[:keep].sqrt()
    up, down = u[:, :keep] * root, root[:, None] * vh[:keep]
    return Conversion(LoraFactors(up.contiguous(), down.contiguous()), "svd", tails[keep] if total else 0.0)


def _svd_of_factors(factors: LoraFactors, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ``up @ down``: by QR of each factor and an R×R core when R is below the
    layer's rank, else of the product itself."""
    if factors.rank < min(shape[0], _width(shape)):
        q_up, r_up = torch.linalg.qr(factors.up)
        q_down, r_down = torch.linalg.qr(factors.down.t())
        u_core, singular, vh_core = torch.linalg.svd(r_up @ r_down.t())
        return q_up @ u_core, singular, vh_core @ q_down.t()
    return torch.linalg.svd(factors.up @ factors.down, full_matrices=False)


# -- a whole file ----------------------------------------------------------------------------------------
KOHYA_TEXT_ENCODER_PREFIXES = {("sdxl", "text_encoder"): "lora_te1_", ("sdxl", "text_encoder_2"): "lora_te2_",
                               ("sd1", "text_encoder"): "lora_te_", ("sd2", "text_encoder"): "lora_te_"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class ModuleConversion:
    """One module's line of a conversion report."""

    module: str
    name: str  # its name in the LoRA file
    method: str
    rank: int
    error: float


@dataclass
class FileConversion:
    """A converted file's tensors and metadata, and per module how it was converted."""

    tensors: dict[str, Tensor]
    metadata: dict[str, str]
    modules: list[ModuleConversion]
    not_converted: list[str] = field(default_factory=list)  # "module [status] reason" of modules that do not apply
    notes: list[str] = field(default_factory=list)  # what a consumer should know (DoRA kept or baked)

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(m.error for m in self.modules) / len(self.modules) if self.modules else 0.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def write(self, output: str, inputs: list[str]) -> str:
        """The tensors written beside ``output``, then renamed into place: a killed run leaves no
        partial file. Refuses to overwrite an input. Returns the absolute path."""
        import os
        import tempfile

        from safetensors.torch import save_file

        out = os.path.abspath(output)
        if out in {os.path.abspath(path) for path in inputs}:
            which = "the input" if len(inputs) == 1 else "one of the inputs"
            raise LohakrError(f"{out}: the output would overwrite {which}; choose another path")
        handle, temporary = tempfile.mkstemp(suffix=".safetensors", dir=os.path.dirname(out))
        os.close(handle)
        try:
            save_file(self.tensors, temporary, self.metadata)
            os.replace(temporary, out)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return out


def kohya_name(module_name: str, target, family: str) -> str:
    """The module's name in a kohya LoRA file: kept when it is one already, else built from the layer."""
    if module_name.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")):
        return module_name
    if target.component == "unet":
        return "lora_unet_" + target.path.replace(".", "_")
    path = target.path if target.path.startswith(("text_model.", "text_projection")) else "text_model." + target.path
    return KOHYA_TEXT_ENCODER_PREFIXES[(family, target.component)] + path.replace(".", "_")


def convert_adapter(adapter, layout, rank: int | str = "exact", max_error: float | None = None,
                    dtype: str | None = None) -> FileConversion:
    """Every module of ``adapter`` that applies on ``layout`` as a LoRA: exact or SVD per layer
    (``to_lora``; a layer several modules patch, such as the rows of a fused original layer, is their
    exact sum), stored in ``dtype`` (default: the adapter's own), the error measured after that cast.
    SDXL/SD1.5: a kohya file (``lora_up``/``lora_down``/``alpha``, one alpha for the file); a
    transformer family: diffusers/PEFT names (``transformer.<path>.lora_A/lora_B``, the scale in
    ``lora_B``). A conv's ``down`` is ``(R, I, k…)``, its ``up`` ``(O, R, 1…)``. DoRA as ``merge_plans``
    says; modules that do not apply are refused as ``plan_load`` refuses them."""
    return merge_adapters([(adapter, 1.0)], layout, rank, max_error, dtype)


def _write_module(tensors: dict[str, Tensor], name: str, conversion: Conversion, shape: tuple[int, ...],
                  alpha: float | None, stored: torch.dtype, delta: Tensor, bias: Tensor | None,
                  magnitude: Tensor | None = None) -> float:
    """One LoRA module into ``tensors``: kohya (``lora_up`` carrying rank/alpha, ``lora_down``,
    ``alpha``) or, with ``alpha=None``, diffusers/PEFT (``lora_B`` carrying the scale, ``lora_A``, no
    alpha: a PEFT loader's default ``lora_alpha = r`` scales by 1). A conv's ``down`` is
    ``(R, I, k…)`` and ``up`` ``(O, R, 1…)``. Returns its relative error against ``delta`` after the
    cast to ``stored``: what a consumer builds from the file."""
    kernel_ones = (1,) * (len(shape) - 2)
    up = conversion.factors.up
    gain = 1.0 if alpha is None else conversion.rank / alpha
    up = (up * gain if gain != 1.0 else up).to(stored)
    down = conversion.factors.down.to(stored)
    delta = delta.reshape(shape[0], -1)
    written = up.float() @ down.float() / gain
    achieved = (written - delta).norm() / delta.norm().clamp_min(1e-30)
    up_key, down_key = ("lora_B.weight", "lora_A.weight") if alpha is None else ("lora_up.weight", "lora_down.weight")
    tensors[f"{name}.{up_key}"] = up.reshape(shape[0], conversion.rank, *kernel_ones).contiguous()
    tensors[f"{name}.{down_key}"] = down.reshape(conversion.rank, *shape[1:]).contiguous()
    if alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    if bias is not None:
        if alpha is None:
            raise LohakrError(f"{name}: a bias delta (diff_b) has no place in a diffusers/PEFT LoRA")
        tensors[f"{name}.diff_b"] = bias.to(stored)
    if magnitude is not None:
        tensors[f"{name}.{'dora_scale' if alpha is not None else 'lora_magnitude_vector'}"] = magnitude.to(stored)
    return float(achieved)


def lora_name(module_name: str, target, family: str) -> str:
    """The module's name in the written LoRA: kohya's for SDXL/SD1.5 (``kohya_name``); for a
    transformer, the diffusers/PEFT path with its component (``transformer.transformer_blocks.0.attn.to_q``),
    or on ComfyUI's own layout its state-dict name (``diffusion_model.double_blocks.0.img_attn.qkv``,
    ``text_encoders.clip_l.transformer.…``), which ComfyUI's loader reads back."""
    if family not in FAMILIES:
        return kohya_name(module_name, target, family)
    host = (target.host_key or "").removesuffix(".weight")
    if host.startswith("diffusion_model."):
        return host
    if host:
        return f"text_encoders.{host}"
    return f"{target.component}.{target.path}"


def _dominant_dtype(adapter) -> torch.dtype:
    counts: dict[torch.dtype, int] = {}
    for module in adapter.modules.values():
        for tensor in module.factors.values():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32


KEPT_METADATA = ("ss_base_model_version", "ss_v2", "ss_output_name", "ss_tag_frequency")


def _conversion_metadata(adapter, lines: list[ModuleConversion], rank, max_error,
                         dtype: torch.dtype) -> dict[str, str]:
    import json

    kept = {k: v for k, v in adapter.metadata.raw.items() if k.startswith("modelspec.") or k in KEPT_METADATA}
    return {
        **kept,
        "ss_network_module": "networks.lora",
        "lohakr_conversion": json.dumps({
            "source": adapter.name, "source_sha256": _sha256(adapter.source), "rank": rank, "max_error": max_error,
            "dtype": str(dtype).removeprefix("torch."),
            "modules": {line.name: {"method": line.method, "rank": line.rank, "error": line.error} for line in lines},
        }),
    }


def format_conversion(conversion: FileConversion, names: int = 10) -> str:
    """The report: per file the modules by method, the maximum and mean error and the size; then
    the modules with the largest errors."""
    methods: dict[str, int] = {}
    for line in conversion.modules:
        methods[line.method] = methods.get(line.method, 0) + 1
    ranks = sorted({line.rank for line in conversion.modules})
    by_method = ", ".join(f"{n} {m}" for m, n in sorted(methods.items()))
    span = f"; ranks {ranks[0]}..{ranks[-1]}" if ranks else ""
    lines = [f"{len(conversion.modules)} modules: {by_method}{span}",
             f"relative error (Frobenius, per module): max {conversion.max_error:.3g}, "
             f"mean {conversion.mean_error:.3g}",
             f"size {conversion.nbytes() / 2**20:.1f} MiB"]
    lines += [f"note: {note}" for note in conversion.notes]
    if conversion.not_converted:
        lines.append(f"{len(conversion.not_converted)} module(s) not converted (they do not apply to this model):")
        lines += [f"  {line}" for line in conversion.not_converted[:names]]
    worst = sorted(conversion.modules, key=lambda line: line.error, reverse=True)[:names]
    lines += [f"  {line.name}: {line.method}, rank {line.rank}, error {line.error:.3g}"
              for line in worst if line.error]
    return "\n".join(lines)


# -- several files into one ----------------------------------------------------------------------------
@torch.no_grad()
def merge_adapters(adapters: list[tuple[object, float]], layout, rank: int | str = "exact",
                   max_error: float | None = None, dtype: str | None = None) -> FileConversion:
    """Several adapters at their strengths as one LoRA (kohya, or diffusers/PEFT names for a
    transformer, as ``convert_adapter``) whose ΔW per layer is their sum
    (docs/format.md#merging-adapters). Per layer the sum is exact as a LoRA of the summed ranks:
    each adapter's exact factors, ``up`` times its strength, side by side. Where ``rank`` or
    ``max_error`` asks for less, a truncated SVD of that sum (from the factors: QR and an R×R SVD),
    the error reported. Every adapter goes through ``plan_load`` first (a file for another base
    model is refused, as in a load); DoRA modules are refused (their update depends on the base)."""
    from .plan import plan_load

    single = len(adapters) == 1 and adapters[0][1] == 1.0  # convert: one file, its own names
    plans = [MergeItem(adapter, plan_load(adapter, layout), lambda match, s=float(strength): s, float(strength))
             for adapter, strength in adapters]
    return merge_plans(plans, layout, rank, max_error, dtype, single=single, base_weight=live_weight)


def live_weight(target) -> Tensor | None:
    """The weight of a layout's live layer (a pipeline's, as it is now: convert before loading
    adapters into it), for DoRA baked through the base; ``None`` for a layout without layers (the
    reference layouts of the command line)."""
    layer = getattr(target, "layer", None)
    return None if layer is None else layer.weight


@dataclass
class MergeItem:
    """One adapter of a merge: its plan on the layout, and the strength of each of its matches
    (a number, or per component and block as a host composes it)."""

    adapter: object
    plan: object  # LoadPlan
    strength_of: object  # Callable[[Match], float]
    strength: float | dict = 1.0  # as recorded in the metadata


@torch.no_grad()
def merge_plans(items: list[MergeItem], layout, rank: int | str = "exact", max_error: float | None = None,
                dtype: str | None = None, *, single: bool = False,
                base_weight: Callable[[object], Tensor | None] | None = None) -> FileConversion:
    """The planned adapters as one LoRA: per layer the sum of every match at its strength
    (``merge_adapters``; ComfyUI's save node passes strengths per component and block).

    DoRA (docs/format.md#dora-in-a-lora): a DoRA module alone on its layer at strength 1 keeps its
    magnitude beside its exact factors where the format has one (``dora_scale`` in kohya files,
    which ComfyUI applies; PEFT's ``lora_magnitude_vector`` for an output-axis DoRA): exact. Any other
    layer with DoRA is baked through the base weights, ``base_weight(target)``: the LoRA is the SVD of
    what the whole stack does to that layer, its error reported; without base weights it is refused."""
    if dtype is not None and dtype not in DTYPES:
        raise LohakrError(f"dtype is {dtype!r}; choose one of {', '.join(DTYPES)}")
    per_layer: dict[str, list] = {}
    targets, names, sources, skipped = {}, {}, {}, []
    for item in items:
        for match in item.plan.matches:
            strength = float(item.strength_of(match))
            if strength == 0:
                continue
            per_layer.setdefault(match.target.key, []).append((match.module, strength))
            targets[match.target.key] = match.target
            names.setdefault(match.target.key, lora_name(match.module.name, match.target, layout.family))
            sources.setdefault(match.target.key, match.module.name)
        prefix = "" if single else f"{item.adapter.name}: "
        skipped += [f"{prefix}{o.module} [{o.status}] {o.reason}" for o in item.plan.report.not_applied]
    if not per_layer:
        raise LohakrError("nothing to write: no module applies at a non-zero strength")
    peft = layout.family in FAMILIES
    stored = DTYPES[dtype] if dtype else _dominant_dtype(items[0].adapter)
    # One layer at a time: its conversion, the rank raised until the cast keeps it within max_error
    # (checked at gain 1, before the file's alpha is known), then its SVD and ΔW dropped: only the
    # chosen factors of every layer are held at once, never every layer's ΔW or SVD.
    layers: dict[str, _LayerPlan] = {}
    for key, contributions in per_layer.items():
        plan = _layer_plan(key, contributions, targets[key], rank, max_error, peft, base_weight)
        if plan.svd is not None and max_error is not None:
            shape = tuple(targets[key].weight_shape)
            delta = plan.delta if plan.delta is not None else _plain_delta(contributions, shape)
            check = functools.partial(_write_module, {}, names[key], shape=shape, alpha=None, stored=stored,
                                      delta=delta, bias=None)
            plan.conversion, _ = _within_error_after_cast(check, plan.conversion, plan.svd, rank, max_error)
        plan.svd = None  # only a baked layer keeps its ΔW: it has no other source
        layers[key] = plan
    ranks = [plan.conversion.rank for plan in layers.values()]
    # kohya: one alpha for the whole file, the most common rank; consumers scale by alpha/rank, so
    # each module's up carries rank/alpha. With one alpha, a loader needs no per-module alpha pattern
    # (diffusers builds those from CLIP paths that transformers 5 renamed, and then ignores them).
    alpha = None if peft else max(set(ranks), key=ranks.count)
    tensors: dict[str, Tensor] = {}
    lines: list[ModuleConversion] = []
    notes: list[str] = []
    above: list[str] = []
    widened: list[str] = []
    methods = {plan.conversion.method for plan in layers.values()}
    kept_magnitude = any(plan.magnitude is not None for plan in layers.values())
    for key in list(layers):
        plan = layers.pop(key)  # its float32 factors go as its stored ones come: at most twice the file
        shape = tuple(targets[key].weight_shape)
        contributions = per_layer[key]
        delta = plan.delta if plan.delta is not None else _plain_delta(contributions, shape)
        biases = [module.bias_delta() * s for module, s in contributions if module.has_bias_delta]
        bias = sum(biases) if biases else None
        achieved = _write_module(tensors, names[key], plan.conversion, shape, alpha, stored, delta, bias,
                                 plan.magnitude)
        if max_error is not None and achieved > max_error and stored != torch.float32:
            # its own rounding in fp16/bf16 is above E even at the largest rank: this module in fp32
            achieved = _write_module(tensors, names[key], plan.conversion, shape, alpha, torch.float32, delta, bias,
                                     plan.magnitude)
            widened.append(names[key])
        if max_error is not None and achieved > max_error:
            above.append(names[key])
        method = plan.conversion.method + (" + DoRA magnitude" if plan.magnitude is not None else "")
        lines.append(ModuleConversion(sources[key] if single else key, names[key], method, plan.conversion.rank,
                                      achieved))
    if widened:
        notes.append(f"{len(widened)} module(s) (e.g. {widened[0]}) are stored in fp32: in "
                     f"{str(stored).removeprefix('torch.')} their rounding alone is above max_error {max_error:g} "
                     "even at the largest rank allowed")
    if above:
        notes.append(f"{len(above)} module(s) (e.g. {above[0]}) stay above max_error {max_error:g} even in fp32 at "
                     "the largest rank allowed: allow a larger rank")
    if kept_magnitude:
        notes.append("DoRA modules keep their magnitude (" + ("lora_magnitude_vector: diffusers and PEFT apply it"
                     if peft else "dora_scale: ComfyUI applies it; diffusers' kohya loader drops it") + ")")
    if "baked" in methods:
        notes.append("DoRA layers in a stack were baked through the base weights: their LoRA is exact for that "
                     "base model only")
    if single:
        metadata = _conversion_metadata(items[0].adapter, lines, rank, max_error, stored)
    else:
        metadata = _merge_metadata(items, lines, rank, max_error, stored)
    return FileConversion(tensors, metadata, lines, skipped, notes)


def _plain_delta(contributions: list[tuple[LayerUpdate, float]], shape: tuple[int, ...]) -> Tensor:
    """``Σ μ·s·R`` of a layer's updates (a DoRA module's plain part: its magnitude goes beside)."""
    return sum(update.delta(shape) * strength for update, strength in contributions)


@dataclass
class _LayerPlan:
    """How one layer is written: its conversion (and the SVD it came from), the update it must
    equal, and a DoRA magnitude kept beside the factors."""

    conversion: Conversion
    svd: tuple | None
    delta: Tensor | None
    magnitude: Tensor | None = None


def _layer_plan(key: str, contributions: list[tuple[LayerUpdate, float]], target, rank: int | str,
                max_error: float | None, peft: bool, base_weight) -> _LayerPlan:
    shape = tuple(target.weight_shape)
    dora = [update for update, _ in contributions if update.dora]
    if not dora:
        conversion, svd = _layer_conversion(contributions, shape, rank, max_error)
        return _LayerPlan(conversion, svd, None)
    update, strength = contributions[0] if len(contributions) == 1 else (None, 0.0)
    # alone on its layer, at strength 1, whole (not rows of a fused layer), on an axis the format has
    keeps = (update is not None and strength == 1.0 and not isinstance(update, RowsOfUpdate)
             and (not peft or update.dora_axis(shape) == "out"))
    if keeps:
        plain = replace(update, dora_scale=None)
        conversion, svd = _layer_conversion([(plain, 1.0)], shape, rank, max_error)
        magnitude = update.dora_scale.reshape(-1) if peft else update.dora_scale
        return _LayerPlan(conversion, svd, None, magnitude.float())
    base = base_weight(target) if base_weight is not None else None
    if base is None or base.is_meta:
        raise LohakrError(f"{dora[0].source}: module {dora[0].name}: a DoRA update depends on the base model's "
                          f"weights ({key}: with other updates on the layer, at a strength other than 1, or in a "
                          "format without its magnitude), and no base weights were given: convert with the model "
                          "(its pipeline's layout, or ComfyUI's save node), or bake it into the checkpoint")
    original = base.detach().to(dtype=torch.float32, copy=True)
    work = original.clone()
    from .apply import patch

    patch(work, work, contributions)
    delta = (work - original).reshape(shape[0], -1)
    svd = torch.linalg.svd(delta, full_matrices=False)
    conversion = _truncated(*svd, len(svd[1]) if rank == "exact" else rank, max_error)
    return _LayerPlan(Conversion(conversion.factors, "baked", conversion.error), svd, delta.reshape(shape))


def _layer_conversion(contributions: list[tuple[LayerUpdate, float]], shape: tuple[int, ...],
                      rank: int | str, max_error: float | None) -> tuple[Conversion, tuple | None]:
    """One layer's updates (at their strengths) as one LoRA, and the SVD it was cut from (``None``
    when exact): a lone update as ``to_lora`` converts it; several exactly, side by side at the
    summed rank, or a truncated SVD of that sum (QR and an R×R SVD)."""
    if len(contributions) == 1 and contributions[0][1] == 1.0:
        update = contributions[0][0]
        exact = exact_rank(update)
        if max_error is None and (rank == "exact" or rank >= exact):
            return to_lora(update, rank, max_error), None
        svd = _svd(update, None)
        return _truncated(*svd, rank, max_error), svd
    parts = [exact_lora(module) for module, _ in contributions]
    summed = LoraFactors(torch.cat([p.up * s for p, (_, s) in zip(parts, contributions, strict=True)], 1),
                         torch.cat([p.down for p in parts], 0))
    if max_error is None and (rank == "exact" or rank >= summed.rank):
        return Conversion(summed, "exact", 0.0), None
    svd = _svd_of_factors(summed, shape)
    return _truncated(*svd, rank, max_error), svd


def _within_error_after_cast(write: Callable[[Conversion], float], conversion: Conversion, svd: tuple | None,
                             rank: int | str, max_error: float | None) -> tuple[Conversion, float]:
    """Write ``conversion``; where its error after the cast to the stored dtype is above
    ``max_error`` (the cast adds to the SVD's tail), write it again at a higher rank of the same SVD,
    up to ``rank``, until it is within. Returns what was written and its error."""
    achieved = write(conversion)
    if max_error is None or svd is None:
        return conversion, achieved
    limit = len(svd[1]) if rank == "exact" else min(rank, len(svd[1]))
    while achieved > max_error and conversion.rank < limit:
        keep = min(limit, conversion.rank + max(1, conversion.rank // 8))
        conversion = _truncated(*svd, keep, None)
        achieved = write(conversion)
    return conversion, achieved


def _merge_metadata(items: list[MergeItem], lines: list[ModuleConversion], rank, max_error,
                    dtype: torch.dtype) -> dict[str, str]:
    import json

    first = items[0].adapter
    kept = {k: v for k, v in first.metadata.raw.items() if k.startswith("modelspec.") or k in KEPT_METADATA[:2]}
    return {
        **kept,
        "ss_network_module": "networks.lora",
        "lohakr_merge": json.dumps({
            "sources": [{"name": i.adapter.name, "sha256": _sha256(i.adapter.source), "strength": i.strength,
                         "block_weights": i.plan.block_weights.spec} for i in items],
            "rank": rank, "max_error": max_error, "dtype": str(dtype).removeprefix("torch."),
            "modules": {line.name: {"method": line.method, "rank": line.rank, "error": line.error} for line in lines},
        }),
    }


def _sha256(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
