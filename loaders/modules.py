"""One adapted layer of a file: its raw factors, its scale, and ΔW on demand (docs/format.md#factor-shapes, #scale, #dora).

A module keeps the tensors exactly as stored (``_a`` is the output side, ``_b`` the input side;
in Tucker mode ``_a`` is ``(r, out)``) and never holds a ΔW: ``delta()`` builds one layer's update
in float32 on the requested device and hands it over. The scale ``s`` is computed in exactly one
place, ``AdapterModule.scale``; the rebuild functions in ``rebuild.py`` return unscaled products.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import Tensor

from . import native, rebuild
from .errors import AdapterShapeError, where


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# Products whose bound stays below this are certain to be finite when built in float32.
FLOAT32_SAFE = torch.finfo(torch.float32).max / 4


def _abs_max(t: Tensor) -> float:
    """max |t|, as a Python float."""
    return float(t.detach().abs().amax()) if t.numel() else 0.0


def _row_sum_max(t: Tensor) -> float:
    """max over rows of Σ |row| (``t`` folded to 2-D): bounds ``|(t @ x)[i, j]|`` by ``· max |x|``."""
    rows = t.detach().reshape(t.shape[0], -1).to(torch.float64).abs().sum(dim=1)
    return float(rows.max()) if rows.numel() else 0.0


def _core_row_sum_max(core: Tensor) -> float:
    """``max_i Σ_j max_k |core[i, j, k…]|``: a Tucker core's part of a rebuild's bound."""
    folded = core.detach().reshape(core.shape[0], core.shape[1], -1).to(torch.float64).abs().amax(dim=2)
    return float(folded.sum(dim=1).max())


def bound_product(*bounds: float) -> float:
    """The product of chained factors' bounds; ``inf`` where any partial product could leave
    float32's range (a GEMM's running sums are bounded by the same partial products)."""
    result = 1.0
    for bound in bounds:
        result *= bound
        if not result <= FLOAT32_SAFE:  # also catches NaN
            return math.inf
    return result


@dataclass(eq=False)
class AdapterModule:
    """Base class: factors as stored plus alpha, DoRA magnitude and the scale rule."""

    name: str
    factors: dict[str, Tensor]
    alpha: float | None = None
    dora_scale: Tensor | None = None
    scalar: float | None = None
    source: str | None = None
    dora_prefer_output: bool = True
    zero_alpha_means_rank: bool = False
    notes: list[str] = field(default_factory=list)
    config_rank: int | None = None  # PEFT's r from adapter_config.json: divides alpha in every case
    _bound: float | None = field(default=None, init=False, repr=False)  # update_bound(), once computed

    kind: ClassVar[str] = ""
    uses_alpha: ClassVar[bool] = True

    # -- description -------------------------------------------------------------------------
    @property
    def rank(self) -> int | None:
        """The rank that alpha is divided by; ``None`` where the scale rule ignores alpha."""
        raise NotImplementedError

    @property
    def tucker(self) -> bool:
        return False

    @property
    def dora(self) -> bool:
        return self.dora_scale is not None

    @property
    def scale(self) -> float:
        """``s`` of docs/format.md#scale: ``α/r``; 1 without alpha or without a rank (full+full LoKr);
        0 for ``α == 0`` (as ComfyUI/A1111/InvokeAI; ``zero_alpha_means_rank`` gives LyCORIS' 1).
        PEFT files divide by their config's r (``config_rank``) always, full LoKr too (docs/format.md#peft-alpha-and-r).
        A stored ``scalar`` (never written by current trainers) multiplies in."""
        rank = self.rank if self.config_rank is None else self.config_rank
        if not self.uses_alpha or rank is None or self.alpha is None:
            s = 1.0
        elif self.alpha == 0:
            s = 1.0 if self.zero_alpha_means_rank else 0.0
        else:
            s = self.alpha / rank
        if self.scalar is not None:
            s *= self.scalar
        return s

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The layer weight shape the factors imply (2-D ``(O, I·k…)`` where kernels are folded)."""
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Input width of a Linear target (the folded input size of a conv)."""
        shape = self.weight_shape
        return _numel(shape[1:]) if len(shape) > 1 else 1

    def tensors(self) -> dict[str, Tensor]:
        """Every stored tensor of this module, DoRA magnitude included."""
        out = dict(self.factors)
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def update_bound(self) -> float:
        """An upper bound on every ``|R[i, j]|`` (the unscaled update), from the factors alone and
        without building R; ``inf`` where R, or a product on the way to it, could leave float32's
        range. The write guard (``guard.py``) uses it to prove a patch finite without a pass over
        the weight. Computed once: the factors never change."""
        if self._bound is None:
            self._bound = self._factor_bound()
        return self._bound

    def _factor_bound(self) -> float:
        raise NotImplementedError

    # -- target checks -----------------------------------------------------------------------
    def check_target(self, weight_shape: tuple[int, ...]) -> str | None:
        """Why this module cannot patch a weight of ``weight_shape``; ``None`` when it can."""
        mine = self.weight_shape
        target = tuple(weight_shape)
        if mine[0] != target[0] or _numel(mine) != _numel(target):
            return (
                f"ΔW is {_fmt(mine)} but the layer weight is {_fmt(target)}"
            )
        if self.dora_scale is not None and not self._dora_axis(target):
            return (
                f"dora_scale has shape {_fmt(_shape(self.dora_scale))}, which fits neither axis "
                f"of the layer weight {_fmt(target)}"
            )
        return None

    def _dora_axis(self, weight_shape: tuple[int, ...]) -> str:
        return rebuild.dora_axis(
            _shape(self.dora_scale), tuple(weight_shape), self.dora_prefer_output
        )

    def dora_axis(self, weight_shape: tuple[int, ...]) -> str:
        """``"out"`` or ``"in"``: the axis this module's DoRA normalises on that weight."""
        return self._dora_axis(weight_shape)

    # -- math --------------------------------------------------------------------------------
    def _factor(self, key: str, device: torch.device | str | None) -> Tensor | None:
        t = self.factors.get(key)
        if t is None:
            return None
        return self._cached(key, device, lambda: t.to(device=device, dtype=torch.float32))

    def _cached(self, key: str, device: torch.device | str | None, build: Callable[[], Tensor]) -> Tensor:
        """``build()``, kept per device while ``float_factors`` is active (else built every call)."""
        cache = self.__dict__.get("_float_factors")
        if cache is None:
            return build()
        hit = cache.get((key, str(device)))
        if hit is None:
            hit = cache[(key, str(device))] = build()
        return hit

    @contextlib.contextmanager
    def float_factors(self):
        """Within this block, factors are cast to float32 (and shared intermediates such as Tucker
        halves built) once per device, not once per row block. Nested blocks share the outer one."""
        if "_float_factors" in self.__dict__:
            yield self
            return
        self.__dict__["_float_factors"] = {}
        try:
            yield self
        finally:
            self.__dict__.pop("_float_factors", None)

    def product_rows(self, start: int, stop: int, device: torch.device | str | None = None) -> Tensor:
        """Output rows ``start:stop`` of the unscaled update R, float32, 2-D ``(rows, I·k…)``.
        Always a new tensor."""
        raise NotImplementedError

    def product(self, device: torch.device | str | None = None) -> Tensor:
        """The whole unscaled update R, float32, 2-D ``(O, I·k…)`` (a new tensor)."""
        return self.product_rows(0, self.out_features, device)

    @torch.no_grad()
    def delta(self, weight_shape: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
        """``s·R`` reshaped to ``weight_shape``, float32 on ``device``; strength not included."""
        self._check(weight_shape)
        product = self.product(device).reshape(weight_shape)
        scale = self.scale
        if scale != 1.0:
            product.mul_(scale)
        return product

    def _check(self, weight_shape: tuple[int, ...]) -> None:
        problem = self.check_target(weight_shape)
        if problem:
            raise AdapterShapeError(f"{where(self.source, self.name)}{problem}")

    def works_by_rows(self, weight_shape: tuple[int, ...]) -> bool:
        """True when ``add_rows`` can patch this weight a block of output rows at a time (everything
        but input-axis DoRA, whose norms need every row)."""
        return self.dora_scale is None or self._dora_axis(tuple(weight_shape)) == "out"

    @property
    def row_alignment(self) -> int:
        """Blocks of output rows this module builds best in (LoKr: the rows of w2)."""
        return 1

    def chunk_elements(self, device: torch.device) -> int:
        """About how many elements one row block should hold on ``device``."""
        return rebuild.GPU_CHUNK_ELEMENTS if device.type == "cuda" else rebuild.CHUNK_ELEMENTS

    def add_rows(self, work: Tensor, start: int, stop: int, strength: float,
                 scratch: rebuild.Scratch | None = None) -> Tensor:
        """Apply this module at ``strength`` to output rows ``start:stop`` of a weight, given as
        ``work`` (float32, ``(rows, I·k…)``, modified in place). Same math as ``add_to``.
        ``scratch``: reusable buffers for intermediates (slots 1 and up; slot 0 is the caller's)."""
        if strength == 0:
            return work
        update = self.product_rows(start, stop, work.device)
        if self.dora_scale is None:
            factor = strength * self.scale
            return work.add_(update) if factor == 1.0 else work.add_(update, alpha=factor)
        if self.scale != 1.0:
            update.mul_(self.scale)
        update.add_(work)
        magnitude = self.dora_scale.reshape(-1)[start:stop].to(device=work.device, dtype=torch.float32)
        rebuild.apply_dora(update, magnitude, "out")
        if strength == 1:
            return work.copy_(update)
        return work.add_(update.sub_(work), alpha=strength)

    def write_patched(self, out: Tensor, source: Tensor, strength: float,
                      scratch: rebuild.Scratch | None = None) -> bool:
        """Write ``source`` patched by this module at ``strength`` into ``out`` (same shape and dtype,
        contiguous; ``out`` may be ``source``) in one pass straight in the weight's dtype, when that
        gives exactly the float32 path's bits. Returns False, writing nothing, when it cannot."""
        return False

    @property
    def has_bias_delta(self) -> bool:
        """True when the module also updates the layer's bias (full ``diff_b``)."""
        return False

    def bias_delta(self, device: torch.device | str | None = None) -> Tensor | None:
        """The bias update, for modules that carry one (full ``diff_b``); else ``None``."""
        return None

    @torch.no_grad()
    def add_to(self, weight: Tensor, strength: float, scratch: rebuild.Scratch | None = None) -> Tensor:
        """Apply this module at ``strength`` to ``weight`` (float32, modified in place).

        Without DoRA: ``W += μ·s·R``. With DoRA: ``W ← W + μ·(DoRA(W + s·R) − W)``, where ``W`` is
        the weight before this module (μ = 0 leaves it exactly unchanged). ``scratch``: buffers to
        reuse across calls (else fresh ones for this call).
        """
        if strength == 0:
            return weight
        shape = _shape(weight)
        self._check(shape)
        if weight.is_contiguous() and self.write_patched(weight, weight, strength, scratch):
            return weight
        if self.works_by_rows(shape) and weight.is_contiguous():
            rows = weight.view(shape[0], -1)
            budget = self.chunk_elements(weight.device)
            scratch = scratch or rebuild.Scratch()
            with self.float_factors():
                for chunk in rebuild.row_chunks(shape[0], rows.shape[1], align=self.row_alignment, budget=budget):
                    self.add_rows(rows[chunk], chunk.start, chunk.stop, strength, scratch)
            return weight
        update = self.delta(shape, weight.device)
        update.add_(weight)
        magnitude = self.dora_scale.to(device=weight.device, dtype=torch.float32)
        rebuild.apply_dora(update, magnitude, self._dora_axis(_shape(weight)))
        if strength == 1:
            return weight.copy_(update)
        return weight.add_(update.sub_(weight), alpha=strength)

    @torch.no_grad()
    def patched_weight(
        self,
        base: Tensor,
        strength: float = 1.0,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """A new tensor: ``base`` patched by this module at ``strength``, computed in float32 and
        cast once to ``base.dtype``."""
        work = base.to(device=device or base.device, dtype=torch.float32, copy=True)
        self.add_to(work, strength)
        return work.to(base.dtype)


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _need(module_name: str, source: str | None, factors: dict[str, Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in factors]
    if missing:
        have = ", ".join(sorted(factors)) or "nothing"
        raise AdapterShapeError(
            f"{where(source, module_name)}missing {', '.join(missing)} (it has {have}); "
            "the file is incomplete or was written by a broken converter"
        )


def _inner(module: AdapterModule, left: str, right: str, left_dim: int, right_dim: int) -> None:
    """Check that two chained factors agree on their shared (rank) dimension."""
    a, b = module.factors[left], module.factors[right]
    if a.dim() <= left_dim or b.dim() <= right_dim or a.shape[left_dim] != b.shape[right_dim]:
        raise AdapterShapeError(
            f"{where(module.source, module.name)}rank mismatch: {left} {_fmt(_shape(a))} does not "
            f"chain with {right} {_fmt(_shape(b))}"
        )


@dataclass(eq=False)
class LohaModule(AdapterModule):
    """LoHa: ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; Tucker (``hada_t1``/``hada_t2``) for k×k convs."""

    kind: ClassVar[str] = "loha"

    def __post_init__(self) -> None:
        f = self.factors
        _need(self.name, self.source, f, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if ("hada_t1" in f) != ("hada_t2" in f):
            _need(self.name, self.source, f, "hada_t1", "hada_t2")
        if self.tucker:
            for i in ("1", "2"):
                t = f[f"hada_t{i}"]
                if t.dim() < 3:
                    raise AdapterShapeError(
                        f"{where(self.source, self.name)}hada_t{i} {_fmt(_shape(t))} is not a "
                        "Tucker core (r, r, k…)"
                    )
                _inner(self, f"hada_t{i}", f"hada_w{i}_a", 0, 0)
                _inner(self, f"hada_t{i}", f"hada_w{i}_b", 1, 0)
        else:
            _inner(self, "hada_w1_a", "hada_w1_b", 1, 0)
            _inner(self, "hada_w2_a", "hada_w2_b", 1, 0)
        if f["hada_w1_b"].shape[0] != f["hada_w2_b"].shape[0]:
            raise AdapterShapeError(
                f"{where(self.source, self.name)}rank mismatch: branch 1 has rank "
                f"{f['hada_w1_b'].shape[0]}, branch 2 rank {f['hada_w2_b'].shape[0]}; no trainer "
                "writes this and the scale alpha/rank would be ambiguous"
            )
        shape1, shape2 = self._branch_shape("1"), self._branch_shape("2")
        if shape1 != shape2:
            raise AdapterShapeError(
                f"{where(self.source, self.name)}the two Hadamard branches have different shapes "
                f"{_fmt(shape1)} and {_fmt(shape2)}"
            )

    @property
    def tucker(self) -> bool:
        return "hada_t1" in self.factors

    def _factor_bound(self) -> float:
        f = self.factors
        branches = []
        for i in ("1", "2"):
            a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
            if self.tucker:
                branches.append(bound_product(_row_sum_max(a.t()), _core_row_sum_max(f[f"hada_t{i}"]), _abs_max(b)))
            else:
                branches.append(bound_product(_row_sum_max(a), _abs_max(b)))
        return bound_product(*branches)

    @property
    def rank(self) -> int:
        return int(self.factors["hada_w1_b"].shape[0])

    def _branch_shape(self, i: str) -> tuple[int, ...]:
        f = self.factors
        a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
        if self.tucker:
            t = f[f"hada_t{i}"]
            return (int(a.shape[1]), int(_numel(_shape(b)[1:])), *_shape(t)[2:])
        return (int(a.shape[0]), int(_numel(_shape(b)[1:])))

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self._branch_shape("1")

    def _branch_factors(self, i: str, device) -> tuple[Tensor, Tensor, Tensor | None]:
        """Branch ``i``'s output factor, 2-D input factor and (Tucker) half, float32 on ``device``."""
        a, b = self._factor(f"hada_w{i}_a", device), self._factor(f"hada_w{i}_b", device)
        if not self.tucker:
            return rebuild.flatten_factor(a), rebuild.flatten_factor(b), None
        b = rebuild.flatten_factor(b)
        half = self._cached(f"half{i}", device, lambda: rebuild.tucker_inner(self._factor(f"hada_t{i}", device), b))
        return a, b, half

    def product_rows(self, start, stop, device=None) -> Tensor:
        g = lambda k: self._factor(k, device)  # noqa: E731
        if self.tucker:
            return rebuild.loha_product(
                g("hada_w1_a"), rebuild.flatten_factor(g("hada_w1_b")),
                g("hada_w2_a"), rebuild.flatten_factor(g("hada_w2_b")),
                g("hada_t1"), g("hada_t2"), start=start, stop=stop,
            )
        return rebuild.loha_product(
            rebuild.flatten_factor(g("hada_w1_a")), g("hada_w1_b"),
            rebuild.flatten_factor(g("hada_w2_a")), g("hada_w2_b"), start=start, stop=stop,
        )

    def add_rows(self, work: Tensor, start: int, stop: int, strength: float,
                 scratch: rebuild.Scratch | None = None) -> Tensor:
        """``work += μ·s·(branch1 ⊙ branch2)[rows]``: in one fused pass where the native kernel was
        checked for this size (``native.loha_add``: a stack of adapters on one CPU weight), else
        both branches built into reused buffers, then one multiply-add (no product buffer)."""
        if strength == 0 or self.dora_scale is not None:
            return super().add_rows(work, start, stop, strength)
        scratch = scratch or rebuild.Scratch()
        if self._fused_fits(work):
            self._fused_rows(work, work, start, stop, strength * self.scale, scratch)
            return work
        branch1, branch2 = self._branch_rows(start, stop, work.shape[1], work.device, scratch)
        return work.addcmul_(branch1, branch2, value=strength * self.scale)

    def write_patched(self, out: Tensor, source: Tensor, strength: float,
                      scratch: rebuild.Scratch | None = None) -> bool:
        """A CPU weight with the native kernels: ``out = source + μ·s·(branch1 ⊙ branch2)``, reading
        and writing the weight once. Where this machine's GEMM bits were checked (rank, size), the
        branches are summed in registers and never stored (``native.loha_add``; half, bfloat16 and
        float32); elsewhere, for half and bfloat16, a row block's branches are built by one GEMM
        into a reused buffer, then added in one pass (float32 returns False: the row path)."""
        if strength == 0 or self.dora_scale is not None or not native.loha_usable(out, source):
            return False
        shape = _shape(out)
        self._check(shape)
        rows_out, rows_source = out.view(shape[0], -1), source.view(shape[0], -1)
        fused = self._fused_fits(rows_out, rows_source)
        if not fused and out.dtype == torch.float32:
            return False
        scratch = scratch or rebuild.Scratch()
        value = strength * self.scale
        with self.float_factors():
            if fused:
                self._fused_rows(rows_out, rows_source, 0, shape[0], value, scratch)
                return True
            for chunk in rebuild.row_chunks(shape[0], rows_out.shape[1], budget=self.chunk_elements(out.device)):
                branch1, branch2 = self._branch_rows(chunk.start, chunk.stop, rows_out.shape[1], out.device, scratch)
                native.hadamard_add(rows_out[chunk], rows_source[chunk], branch1, branch2, value)
        return True

    def _fused_fits(self, rows: Tensor, *others: Tensor) -> bool:
        """True when the fused native kernel may patch ``rows`` (a 2-D block of this layer's weight,
        and ``others`` read beside it): usable here, and checked for its size and rank."""
        return native.loha_usable(rows, *others) and native.loha_fused(rows.dtype, *rows.shape, self._gemm_inner)

    def _fused_rows(self, out: Tensor, source: Tensor, start: int, stop: int, value: float,
                    scratch: rebuild.Scratch) -> None:
        """``out = source + value·(branch1 ⊙ branch2)[start:stop]`` by the fused native kernel;
        ``out``/``source``: those rows, ``(stop - start, I·k…)``. Its packed factors go to slot 1."""
        outs, ins = self._stacked_factors(out.device)
        rows = outs[:, :, start:stop].transpose(1, 2) if self.tucker else outs[:, start:stop]
        packed = scratch.get(out.device, (1, native.packed_size(ins.shape[1], out.shape[1])), slot=1)
        native.loha_add(out, source, rows, ins, value, packed.view(-1))

    @property
    def _gemm_inner(self) -> int:
        """The inner size of the branch GEMMs: the rank, or a Tucker core's first rank."""
        return int(self.factors["hada_t1"].shape[0]) if self.tucker else self.rank

    def _branch_rows(self, start: int, stop: int, width: int, device, scratch: rebuild.Scratch) -> tuple[Tensor, Tensor]:
        """Rows ``start:stop`` of both Hadamard branches, built by one batched GEMM into the reused
        scratch slot 1 (float32, each ``(rows, width)``)."""
        outs, ins = self._stacked_factors(device)
        both = scratch.get(device, (2 * (stop - start), width), slot=1).view(2, stop - start, -1)
        return rebuild.loha_branches_rows(outs, ins, start, stop, self.tucker, out=both)

    def _stacked_factors(self, device) -> tuple[Tensor, Tensor]:
        """Both branches' factors stacked for ``rebuild.loha_branches_rows`` (built once per device
        inside ``float_factors``): output factors ``(2, O, r)`` (Tucker: ``(2, r, O)``) and input
        factors ``(2, r, I·k…)`` (Tucker: the halves, ``tucker_inner``)."""
        def build() -> tuple[Tensor, Tensor]:
            pairs = [self._branch_factors(i, device) for i in ("1", "2")]
            outs = torch.stack([a for a, _, _ in pairs])
            if self.tucker:
                return outs, torch.stack([h.reshape(h.shape[0], -1) for _, _, h in pairs])
            return outs, torch.stack([b for _, b, _ in pairs])

        return self._cached("stacked", device, build)


@dataclass(eq=False)
class LokrModule(AdapterModule):
    """LoKr: ``w1 ⊗ w2``, each factor full or low-rank; w2 may be a Tucker rebuild."""

    kind: ClassVar[str] = "lokr"

    def __post_init__(self) -> None:
        f = self.factors
        if "lokr_w1" in f and "lokr_w1_a" in f:
            raise AdapterShapeError(
                f"{where(self.source, self.name)}has both lokr_w1 and lokr_w1_a/_b; it is "
                "ambiguous which one is meant"
            )
        if "lokr_w2" in f and "lokr_w2_a" in f:
            raise AdapterShapeError(
                f"{where(self.source, self.name)}has both lokr_w2 and lokr_w2_a/_b; it is "
                "ambiguous which one is meant"
            )
        if "lokr_w1" not in f:
            _need(self.name, self.source, f, "lokr_w1_a", "lokr_w1_b")
            _inner(self, "lokr_w1_a", "lokr_w1_b", 1, 0)
        if "lokr_w2" not in f:
            _need(self.name, self.source, f, "lokr_w2_a", "lokr_w2_b")
            if "lokr_t2" in f:
                _inner(self, "lokr_t2", "lokr_w2_a", 0, 0)
                _inner(self, "lokr_t2", "lokr_w2_b", 1, 0)
            else:
                _inner(self, "lokr_w2_a", "lokr_w2_b", 1, 0)
        elif "lokr_t2" in f:
            raise AdapterShapeError(
                f"{where(self.source, self.name)}lokr_t2 is present but w2 is stored full "
                "(lokr_w2); a Tucker core needs lokr_w2_a/_b"
            )
        if self.w1_low_rank and self.w2_low_rank:
            r1, r2 = int(f["lokr_w1_b"].shape[0]), int(f["lokr_w2_b"].shape[0])
            if r1 != r2:
                self.notes.append(
                    f"w1 has rank {r1} and w2 rank {r2}; the scale uses the w2 rank as "
                    "ComfyUI and A1111 do"
                )

    @property
    def row_alignment(self) -> int:
        return self.w2_shape[0]

    def chunk_elements(self, device: torch.device) -> int:
        if device.type == "cuda" or self.dora_scale is not None:
            return super().chunk_elements(device)
        return rebuild.BROADCAST_CHUNK_ELEMENTS

    def add_rows(self, work: Tensor, start: int, stop: int, strength: float,
                 scratch: rebuild.Scratch | None = None) -> Tensor:
        """``work += μ·s·(w1 ⊗ w2)[rows]`` as one multiply-add, never materialising the Kronecker
        product, when the rows are whole w2 blocks or lie in one block."""
        b = self.w2_shape[0]
        aligned = start % b == 0 and stop % b == 0
        if strength == 0 or self.dora_scale is not None or not (aligned or start // b == (stop - 1) // b):
            return super().add_rows(work, start, stop, strength)
        t1, t2 = self.kron_operands(work.device, torch.float32)
        return rebuild.kron_add_rows(work, start, stop, t1, t2, strength * self.scale)

    def write_patched(self, out: Tensor, source: Tensor, strength: float,
                      scratch: rebuild.Scratch | None = None) -> bool:
        """On the CPU, ``out = source + μ·s·(w1 ⊗ w2)`` in one pass over the weight, never building
        the Kronecker product. Half/bfloat16 with the native kernels: ``native.kron_add``, any
        factors. Else one PyTorch multiply-add in the weight's own dtype, taken only where the bits
        equal the float32 path's: w1 and w2 exact in that dtype (full factors stored in it; a
        low-rank product, float32, is not even tried below float32: it practically never is) and a
        PyTorch that multiply-adds half/bfloat16 in float32 (``rebuild.addcmul_rounds_once``).
        Never with DoRA."""
        if strength != 0 and self.dora_scale is None and native.usable(out, source):
            self._check(_shape(out))
            w1, w2 = self.factors_w1_w2(out.device)
            rows = w1.shape[0] * w2.shape[0]
            native.kron_add(out.view(rows, -1), source.view(rows, -1), w1 * (strength * self.scale),
                            w2.reshape(w2.shape[0], -1))
            return True
        dtype = out.dtype
        low_rank = self.w1_low_rank or self.w2_low_rank
        if (strength == 0 or self.dora_scale is not None or (low_rank and dtype != torch.float32)
                or out.device.type != "cpu"
                or source.device != out.device or source.dtype != dtype
                or dtype not in (torch.float16, torch.bfloat16, torch.float32)
                or not (out.is_contiguous() and source.is_contiguous())
                or not rebuild.addcmul_rounds_once(dtype)):
            return False
        self._check(_shape(out))
        operands = self.kron_operands(out.device, dtype)
        if operands is None:
            return False
        rebuild.kron_add(out, source, *operands, strength * self.scale)
        return True

    def kron_operands(self, device, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor] | None:
        """``rebuild.kron_operands`` of w1 and w2 in ``dtype`` (built once per device inside
        ``float_factors``), or ``None`` if either factor would lose bits in ``dtype``."""
        def build() -> tuple[Tensor, ...]:
            stored = self.factors.get("lokr_w1"), self.factors.get("lokr_w2")
            if dtype != torch.float32 and all(t is not None and t.dtype == dtype for t in stored):
                # Both factors stored full in the weight's dtype: exact there as they are; no
                # float32 round trip (about a tenth of a full-w2 LoKr's in-place patch time).
                w1, w2 = (t.to(device) for t in stored)
                return rebuild.kron_operands(w1.reshape(self.w1_shape), w2.reshape(w2.shape[0], -1))
            w1, w2 = self.factors_w1_w2(device)
            w2 = w2.reshape(w2.shape[0], -1)
            if dtype != torch.float32:
                w1, w2 = rebuild.exactly_in(w1, dtype), rebuild.exactly_in(w2, dtype)
                if w1 is None or w2 is None:
                    return ()
            return rebuild.kron_operands(w1, w2)

        return self._cached(f"kron operands {dtype}", device, build) or None

    def _factor_bound(self) -> float:
        f = self.factors
        if self.w1_low_rank:
            w1 = bound_product(_row_sum_max(f["lokr_w1_a"]), _abs_max(f["lokr_w1_b"]))
        else:
            w1 = _abs_max(f["lokr_w1"])
        if not self.w2_low_rank:
            w2 = _abs_max(f["lokr_w2"])
        elif self.tucker:
            w2 = bound_product(_row_sum_max(f["lokr_w2_a"].t()), _core_row_sum_max(f["lokr_t2"]), _abs_max(f["lokr_w2_b"]))
        else:
            w2 = bound_product(_row_sum_max(f["lokr_w2_a"]), _abs_max(f["lokr_w2_b"]))
        return bound_product(w1, w2)

    @property
    def w1_low_rank(self) -> bool:
        return "lokr_w1" not in self.factors

    @property
    def w2_low_rank(self) -> bool:
        return "lokr_w2" not in self.factors

    @property
    def tucker(self) -> bool:
        return "lokr_t2" in self.factors

    @property
    def rank(self) -> int | None:
        f = self.factors
        if self.w2_low_rank:
            return int(f["lokr_w2_b"].shape[0])
        if self.w1_low_rank:
            return int(f["lokr_w1_b"].shape[0])
        return None

    @property
    def w1_shape(self) -> tuple[int, int]:
        f = self.factors
        if "lokr_w1" in f:
            w1 = f["lokr_w1"]
            return (int(w1.shape[0]), int(_numel(_shape(w1)[1:])))
        return (int(f["lokr_w1_a"].shape[0]), int(_numel(_shape(f["lokr_w1_b"])[1:])))

    @property
    def w2_shape(self) -> tuple[int, ...]:
        f = self.factors
        if "lokr_w2" in f:
            return _shape(f["lokr_w2"])
        if self.tucker:
            return (int(f["lokr_w2_a"].shape[1]), int(f["lokr_w2_b"].shape[1]),
                    *_shape(f["lokr_t2"])[2:])
        return (int(f["lokr_w2_a"].shape[0]), int(_numel(_shape(f["lokr_w2_b"])[1:])))

    @property
    def factor(self) -> int:
        """The smaller Kronecker block size, what ``factor=`` in training args produces."""
        return max(self.w1_shape)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        (a, c), w2 = self.w1_shape, self.w2_shape
        return (a * w2[0], c * w2[1], *w2[2:])

    def factors_w1_w2(self, device=None) -> tuple[Tensor, Tensor]:
        """The two Kronecker factors, rebuilt (once per device inside ``float_factors``): w1 ``(a, c)``
        and w2 ``(b, d[, *k])`` or ``(b, d·k…)``."""
        g = lambda k: self._factor(k, device)  # noqa: E731
        w1 = self._cached("w1", device, lambda: rebuild.lokr_w1(
            g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b")).reshape(self.w1_shape))

        def build_w2() -> Tensor:
            w2_b = g("lokr_w2_b")
            if w2_b is not None:
                w2_b = rebuild.flatten_factor(w2_b)
            return rebuild.lokr_w2(g("lokr_w2"), g("lokr_w2_a"), w2_b, g("lokr_t2"))

        w2 = self._cached("w2", device, build_w2)
        expected = self.w2_shape
        if _shape(w2) != expected:
            raise AdapterShapeError(
                f"{where(self.source, self.name)}w2 rebuilds to {_fmt(_shape(w2))}, expected {_fmt(expected)}"
            )
        return w1, w2

    def product_rows(self, start, stop, device=None) -> Tensor:
        w1, w2 = self.factors_w1_w2(device)
        rows = rebuild.kron_rows(w1, w2, start, stop)
        width = _numel(self.weight_shape[1:])
        if _shape(rows) != (stop - start, width):  # docs/format.md#tv-kron-pad: never reshape a wrongly padded kron
            raise AdapterShapeError(
                f"{where(self.source, self.name)}Kronecker rows have shape {_fmt(_shape(rows))}, "
                f"expected {_fmt((stop - start, width))}"
            )
        return rows


@dataclass(eq=False)
class LoraModule(AdapterModule):
    """LoRA/LoCon in a mixed file: ``up @ down``, or the Tucker form with ``lora_mid``."""

    kind: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        f = self.factors
        _need(self.name, self.source, f, "lora_up.weight", "lora_down.weight")
        if "lora_mid.weight" in f:
            _inner(self, "lora_up.weight", "lora_mid.weight", 1, 0)
            _inner(self, "lora_mid.weight", "lora_down.weight", 1, 0)
        else:
            _inner(self, "lora_up.weight", "lora_down.weight", 1, 0)

    @property
    def tucker(self) -> bool:
        return "lora_mid.weight" in self.factors

    def _factor_bound(self) -> float:
        f = self.factors
        mid = f.get("lora_mid.weight")
        core = [] if mid is None else [_core_row_sum_max(mid)]
        return bound_product(_row_sum_max(f["lora_up.weight"]), *core, _abs_max(f["lora_down.weight"]))

    @property
    def rank(self) -> int:
        return int(self.factors["lora_down.weight"].shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        f = self.factors
        out = int(f["lora_up.weight"].shape[0])
        down = _shape(f["lora_down.weight"])
        if self.tucker:
            return (out, down[1], *_shape(f["lora_mid.weight"])[2:])
        return (out, _numel(down[1:]))

    def product_rows(self, start, stop, device=None) -> Tensor:
        g = lambda k: self._factor(k, device)  # noqa: E731
        return rebuild.lora_product(g("lora_up.weight"), g("lora_down.weight"), g("lora_mid.weight"), start, stop)


@dataclass(eq=False)
class FullModule(AdapterModule):
    """A full ΔW (``diff``) and optional bias delta (``diff_b``), LyCORIS ``algo=full``."""

    kind: ClassVar[str] = "full"
    uses_alpha: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _need(self.name, self.source, self.factors, "diff")

    @property
    def rank(self) -> None:
        return None

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return _shape(self.factors["diff"])

    def _factor_bound(self) -> float:
        return bound_product(max(_abs_max(t) for t in self.factors.values()))  # diff, and diff_b for the bias

    def product_rows(self, start, stop, device=None) -> Tensor:
        diff = self.factors["diff"]
        return diff.reshape(diff.shape[0], -1)[start:stop].to(device=device, dtype=torch.float32, copy=True)

    @property
    def has_bias_delta(self) -> bool:
        return "diff_b" in self.factors

    def bias_delta(self, device=None) -> Tensor | None:
        bias = self.factors.get("diff_b")
        if bias is None:
            return None
        return bias.to(device=device, dtype=torch.float32, copy=True).mul_(self.scale)


MODULE_CLASSES: dict[str, type[AdapterModule]] = {
    cls.kind: cls for cls in (LohaModule, LokrModule, LoraModule, FullModule)
}
