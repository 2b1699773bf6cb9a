"""What one module of a file holds: its factors as stored, their validation and shapes, the scale,
a bound on its update, and one product: rows of the unscaled update R (docs/format.md#factor-shapes,
#scale, #dora).

An update keeps the tensors exactly as stored (``_a`` is the output side, ``_b`` the input side;
in Tucker mode ``_a`` is ``(r, out)``) and never holds a ΔW. How a weight gets changed by it (which
strategy, in which dtype, in place or not) is ``apply.py``'s job. The scale ``s`` is computed in
exactly one place, ``LayerUpdate.scale``; the functions of ``rebuild.py`` return unscaled products.
Factors cast to float32, and what is built from them, are kept by an explicit ``FactorCache`` that
the caller passes in for the length of one weight's patch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

from .errors import AdapterShapeError, where
from .lazy import lazy_module

torch = lazy_module("torch")
rebuild = lazy_module(".rebuild", __package__)

if TYPE_CHECKING:  # torch is imported where tensors are built: describing a file needs none
    import torch  # noqa: F811
    from torch import Tensor

    Device = torch.device | str | None


class FactorCache:
    """Factors cast to float32 and intermediates built from them (Tucker halves, LoKr's w1 and w2,
    LoHa's stacked factors, Kronecker operands), per (update, what, device). One cache serves one
    weight's patch: its row blocks reuse what the first block built. ``None`` in its place builds
    everything on every call."""

    def __init__(self) -> None:
        self._entries: dict[tuple[int, str, Device], object] = {}

    def get(self, update: LayerUpdate, what: str, device: Device, build: Callable[[], object]):
        key = (id(update), what, device)
        if key not in self._entries:
            self._entries[key] = build()
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


def cached(cache: FactorCache | None, update: LayerUpdate, what: str, device: Device, build: Callable[[], object]):
    """``build()`` through ``cache`` when there is one."""
    return build() if cache is None else cache.get(update, what, device, build)


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# Products whose bound stays below this are certain to be finite when built in float32.
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
FLOAT32_SAFE = FLOAT32_MAX / 4


def _abs_max(t: Tensor) -> float:
    """max |t|, as a Python float (one pass, no temporary: an adapter's factors are read once)."""
    if not t.numel():
        return 0.0
    low, high = torch.aminmax(t.detach())
    return max(-float(low), float(high))


def _row_sum_max(t: Tensor) -> float:
    """max over rows of Σ |row| (``t`` folded to 2-D): bounds ``|(t @ x)[i, j]|`` by ``· max |x|``.
    Summed in float32 in one kernel, then raised by the most that float32 rounding can have taken."""
    rows = t.detach().reshape(t.shape[0], -1)
    if not rows.numel():
        return 0.0
    return float(rows.abs().sum(dim=1, dtype=torch.float32).amax()) * (1 + rows.shape[1] * 2.0**-23)


def _core_row_sum_max(core: Tensor) -> float:
    """``max_i Σ_j max_k |core[i, j, k…]|``: a Tucker core's part of a rebuild's bound."""
    folded = core.detach().reshape(core.shape[0], core.shape[1], -1).abs().amax(dim=2)
    return _row_sum_max(folded)


def dora_axis(scale_shape: tuple[int, ...], weight_shape: tuple[int, ...], prefer_output: bool) -> str:
    """Which axis a ``dora_scale`` of this shape normalises: ``"out"`` or ``"in"`` (docs/format.md#dora-axis).

    ``(O, 1, …)`` and 1-D ``[O]`` mean the output axis, ``(1, I, …)`` the input axis. When both
    readings fit (O == 1 or I == 1) ``prefer_output`` decides. Returns ``""`` if neither fits.
    """
    out_dim = weight_shape[0]
    in_dim = weight_shape[1] if len(weight_shape) > 1 else 1
    dims = [d for d in scale_shape]
    if len(dims) == 1:
        return "out" if dims[0] == out_dim else ""
    rest_one = all(d == 1 for d in dims[2:])
    fits_out = rest_one and dims[0] == out_dim and dims[1] == 1
    fits_in = rest_one and dims[0] == 1 and dims[1] == in_dim
    if fits_out and fits_in:
        return "out" if prefer_output else "in"
    if fits_out:
        return "out"
    if fits_in:
        return "in"
    return ""


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
class LayerUpdate:
    """One module of a file: factors as stored plus alpha, DoRA magnitude and the scale rule."""

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
    _fitting: set[tuple[int, ...]] = field(default_factory=set, init=False, repr=False)  # shapes check_shape passed

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
        PEFT files divide by their config's r (``config_rank``) always, full LoKr too
        (docs/format.md#peft-alpha-and-r).
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
        if self.dora_scale is not None and not self.dora_axis(target):
            return (
                f"dora_scale has shape {_fmt(_shape(self.dora_scale))}, which fits neither axis "
                f"of the layer weight {_fmt(target)}"
            )
        return None

    def dora_axis(self, weight_shape: tuple[int, ...]) -> str:
        """``"out"`` or ``"in"``: the axis this module's DoRA normalises on that weight (``""``: neither
        fits; docs/format.md#dora-axis)."""
        return dora_axis(_shape(self.dora_scale), tuple(weight_shape), self.dora_prefer_output)

    # -- the product ------------------------------------------------------------------------
    def float_factor(self, key: str, device: Device, cache: FactorCache | None = None) -> Tensor | None:
        """Stored factor ``key`` as float32 on ``device`` (``None`` if the module has none)."""
        stored = self.factors.get(key)
        if stored is None:
            return None
        return cached(cache, self, key, device, lambda: stored.to(device=device, dtype=torch.float32))

    def rows(self, start: int, stop: int, device: Device = None, cache: FactorCache | None = None) -> Tensor:
        """Output rows ``start:stop`` of the unscaled update R, float32, 2-D ``(rows, I·k…)``; always
        a new tensor. The one product every strategy can fall back on."""
        raise NotImplementedError

    def check_shape(self, weight_shape: tuple[int, ...]) -> None:
        """Raise ``AdapterShapeError`` (file and module named) if this cannot patch that weight.
        A shape that passed once is remembered: every patch of a layer checks it again."""
        if weight_shape in self._fitting:
            return
        problem = self.check_target(weight_shape)
        if problem:
            raise AdapterShapeError(f"{where(self.source, self.name)}{problem}")
        self._fitting.add(tuple(weight_shape))

    @property
    def row_alignment(self) -> int:
        """Blocks of output rows this update builds best in (LoKr: the rows of w2)."""
        return 1

    @property
    def has_bias_delta(self) -> bool:
        """True when the module also updates the layer's bias (full ``diff_b``)."""
        return False

    def bias_delta(self, device: Device = None) -> Tensor | None:
        """``s·diff_b`` in float32, for modules that carry one; else ``None``."""
        return None

    # -- row slices (docs/names-and-blocks.md#fused-and-split-layers) ---------------------------
    def row_pieces(self, start: int, stop: int) -> list[tuple[int, LayerUpdate]]:
        """Output rows ``start:stop`` of this update as updates of the same algorithm whose factors
        are views of these (no product is built): ``[(offset, piece)]``, offsets from ``start``,
        the pieces stacked in row order. One piece for every algorithm but a LoKr whose range cuts
        through w2's row blocks (up to three pieces then: partial block, whole blocks, partial
        block). Raises ``AdapterShapeError`` for an input-axis DoRA, whose norms need every row."""
        if not 0 <= start < stop <= self.out_features:
            raise AdapterShapeError(f"{where(self.source, self.name)}rows {start}:{stop} are outside its "
                                    f"{self.out_features} output rows")
        if start == 0 and stop == self.out_features:
            return [(0, self)]
        problem = self.why_not_splittable()
        if problem:
            raise AdapterShapeError(problem)
        return [(0, self._sliced(self._sliced_factors(start, stop), start, stop))]

    def _sliced_factors(self, start: int, stop: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def why_not_splittable(self) -> str | None:
        """Why this update's rows cannot go to separate layers (an input-axis DoRA); ``None`` if they can."""
        if self.dora_scale is not None and self.dora_axis(self.weight_shape) != "out":
            return (f"{where(self.source, self.name)}its DoRA normalises over the input axis, across all "
                    f"{self.out_features} output rows of the fused layer, so it cannot be split into separate "
                    "layers exactly")
        return None

    def _sliced(self, factors: dict[str, Tensor], start: int, stop: int) -> LayerUpdate:
        """This update with ``factors`` and the matching rows of its DoRA magnitude (``row_pieces``
        has checked that it can be split)."""
        magnitude = None if self.dora_scale is None else self.dora_scale[start:stop]
        return replace(self, factors=factors, dora_scale=magnitude)

    # -- conveniences (one implementation each, through apply.py) ------------------------------
    def delta(self, weight_shape: tuple[int, ...], device: Device = None) -> Tensor:
        """``s·R`` reshaped to ``weight_shape``, float32 on ``device``; strength not included."""
        from .apply import delta

        return delta(self, weight_shape, device)

    def patched_weight(self, base: Tensor, strength: float = 1.0, device: Device = None) -> Tensor:
        """A new tensor: ``base`` patched by this module at ``strength``, computed in float32 and
        cast once to ``base.dtype``."""
        from .apply import patched_weight

        return patched_weight(self, base, strength, device)


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


def _inner(module: LayerUpdate, left: str, right: str, left_dim: int, right_dim: int) -> None:
    """Check that two chained factors agree on their shared (rank) dimension, and that an output
    factor has the shape its product needs: ``(out, rank)`` (trailing 1s of a conv allowed) in a
    plain chain, exactly ``(rank, out)`` beside a Tucker core."""
    a, b = module.factors[left], module.factors[right]
    if a.dim() <= left_dim or b.dim() <= right_dim or a.shape[left_dim] != b.shape[right_dim]:
        raise AdapterShapeError(
            f"{where(module.source, module.name)}rank mismatch: {left} {_fmt(_shape(a))} does not "
            f"chain with {right} {_fmt(_shape(b))}"
        )
    if (right.endswith("_b") or right == "lora_down.weight") and b.dim() < 2:
        raise AdapterShapeError(f"{where(module.source, module.name)}{right} has shape {_fmt(_shape(b))}; an input "
                                "factor is (rank, in…)")
    output_factor, expected = (a, "(out, rank)") if left_dim == 1 else (b, "(rank, out) beside a Tucker core")
    name = left if left_dim == 1 else right
    is_output = name.endswith("_a") or name == "lora_up.weight"
    if is_output and (output_factor.dim() < 2 if left_dim == 1 else output_factor.dim() != 2):
        raise AdapterShapeError(f"{where(module.source, module.name)}{name} has shape {_fmt(_shape(output_factor))}; "
                                f"an output factor is {expected}")
    if is_output and left_dim == 1 and any(d != 1 for d in output_factor.shape[2:]):
        raise AdapterShapeError(f"{where(module.source, module.name)}{name} has shape {_fmt(_shape(output_factor))}; "
                                f"an output factor is {expected}, with only 1s after that")


@dataclass(eq=False)
class LohaUpdate(LayerUpdate):
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

    def _sliced_factors(self, start: int, stop: int) -> dict[str, Tensor]:
        f = dict(self.factors)
        for key in ("hada_w1_a", "hada_w2_a"):  # Tucker: (r, out); else (out, r…)
            f[key] = f[key][:, start:stop] if self.tucker else f[key][start:stop]
        return f

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

    @property
    def gemm_inner(self) -> int:
        """The inner size of the branch GEMMs: the rank, or a Tucker core's first rank."""
        return int(self.factors["hada_t1"].shape[0]) if self.tucker else self.rank

    def stacked_factors(self, device: Device, cache: FactorCache | None = None) -> tuple[Tensor, Tensor]:
        """Both branches' factors stacked for one batched GEMM (``rebuild.loha_branches_rows``),
        float32 on ``device``: output factors ``(2, O, r)`` (Tucker: ``(2, r, O)``) and input factors
        ``(2, r, I·k…)`` (Tucker: the core contracted with the input factor, ``tucker_inner``)."""
        def build() -> tuple[Tensor, Tensor]:
            outs, ins = [], []
            for i in ("1", "2"):
                out_factor = self.float_factor(f"hada_w{i}_a", device, cache)
                in_factor = rebuild.flatten_factor(self.float_factor(f"hada_w{i}_b", device, cache))
                if self.tucker:
                    half = rebuild.tucker_inner(self.float_factor(f"hada_t{i}", device, cache), in_factor)
                    outs.append(out_factor)
                    ins.append(half.reshape(half.shape[0], -1))
                else:
                    outs.append(rebuild.flatten_factor(out_factor))
                    ins.append(in_factor)
            return torch.stack(outs), torch.stack(ins)

        return cached(cache, self, "stacked", device, build)

    def rows(self, start: int, stop: int, device: Device = None, cache: FactorCache | None = None) -> Tensor:
        def stored(key: str) -> Tensor | None:
            return self.float_factor(key, device, cache)

        if self.tucker:
            return rebuild.loha_product(
                stored("hada_w1_a"), rebuild.flatten_factor(stored("hada_w1_b")),
                stored("hada_w2_a"), rebuild.flatten_factor(stored("hada_w2_b")),
                stored("hada_t1"), stored("hada_t2"), start=start, stop=stop,
            )
        return rebuild.loha_product(
            rebuild.flatten_factor(stored("hada_w1_a")), stored("hada_w1_b"),
            rebuild.flatten_factor(stored("hada_w2_a")), stored("hada_w2_b"), start=start, stop=stop,
        )


@dataclass(eq=False)
class LokrUpdate(LayerUpdate):
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
        for key in ("lokr_w1", "lokr_w2"):
            if key in f and f[key].dim() < 2:
                raise AdapterShapeError(f"{where(self.source, self.name)}{key} has shape {_fmt(_shape(f[key]))}; a "
                                        "Kronecker factor has at least two dimensions (rows, columns…)")
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

    def _factor_bound(self) -> float:
        f = self.factors
        if self.w1_low_rank:
            w1 = bound_product(_row_sum_max(f["lokr_w1_a"]), _abs_max(f["lokr_w1_b"]))
        else:
            w1 = _abs_max(f["lokr_w1"])
        if not self.w2_low_rank:
            w2 = _abs_max(f["lokr_w2"])
        elif self.tucker:
            w2 = bound_product(_row_sum_max(f["lokr_w2_a"].t()), _core_row_sum_max(f["lokr_t2"]),
                               _abs_max(f["lokr_w2_b"]))
        else:
            w2 = bound_product(_row_sum_max(f["lokr_w2_a"]), _abs_max(f["lokr_w2_b"]))
        return bound_product(w1, w2)

    def row_pieces(self, start: int, stop: int) -> list[tuple[int, LayerUpdate]]:
        """Row ``i·p + q`` of ``w1 ⊗ w2`` (p = rows of w2) is ``w1[i] ⊗ w2[q]``: whole w2 blocks are
        rows of w1 with all of w2, a cut block is one row of w1 with rows of w2."""
        if not 0 <= start < stop <= self.out_features or (start, stop) == (0, self.out_features):
            return super().row_pieces(start, stop)
        problem = self.why_not_splittable()
        if problem:
            raise AdapterShapeError(problem)
        p = self.w2_shape[0]
        spans = []  # (w1 rows, w2 rows) of each piece, in row order
        row = start
        while row < stop:
            i, q = divmod(row, p)
            if q == 0 and stop - row >= p:
                n = (stop - row) // p
                spans.append(((i, i + n), (0, p)))
            else:
                n = 1
                spans.append(((i, i + 1), (q, min(p, q + stop - row))))
            row += n * (spans[-1][1][1] - spans[-1][1][0])
        pieces, offset = [], 0
        for (i0, i1), (q0, q1) in spans:
            pieces.append((offset, self._sliced(self._kron_factors(i0, i1, q0, q1), start + offset,
                                                start + offset + (i1 - i0) * (q1 - q0))))
            offset += (i1 - i0) * (q1 - q0)
        assert offset == stop - start, (start, stop, spans)
        return pieces

    def _kron_factors(self, i0: int, i1: int, q0: int, q1: int) -> dict[str, Tensor]:
        """The factors of ``w1[i0:i1] ⊗ w2[q0:q1]``."""
        f = dict(self.factors)
        key = "lokr_w1" if "lokr_w1" in f else "lokr_w1_a"
        f[key] = f[key][i0:i1]
        if (q0, q1) != (0, self.w2_shape[0]):
            if "lokr_w2" in f:
                f["lokr_w2"] = f["lokr_w2"][q0:q1]
            elif self.tucker:  # (r, out) beside the core
                f["lokr_w2_a"] = f["lokr_w2_a"][:, q0:q1]
            else:
                f["lokr_w2_a"] = f["lokr_w2_a"][q0:q1]
        return f

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

    def factors_w1_w2(self, device: Device = None, cache: FactorCache | None = None) -> tuple[Tensor, Tensor]:
        """The two Kronecker factors, rebuilt in float32 on ``device``: w1 ``(a, c)`` and w2
        ``(b, d[, *k])`` or ``(b, d·k…)``."""
        def stored(key: str) -> Tensor | None:
            return self.float_factor(key, device, cache)

        def build_w1() -> Tensor:
            return rebuild.lokr_w1(stored("lokr_w1"), stored("lokr_w1_a"), stored("lokr_w1_b")).reshape(self.w1_shape)

        def build_w2() -> Tensor:
            in_factor = stored("lokr_w2_b")
            if in_factor is not None:
                in_factor = rebuild.flatten_factor(in_factor)
            return rebuild.lokr_w2(stored("lokr_w2"), stored("lokr_w2_a"), in_factor, stored("lokr_t2"))

        w1 = cached(cache, self, "w1", device, build_w1)
        w2 = cached(cache, self, "w2", device, build_w2)
        expected = self.w2_shape
        if _shape(w2) != expected:
            raise AdapterShapeError(
                f"{where(self.source, self.name)}w2 rebuilds to {_fmt(_shape(w2))}, expected {_fmt(expected)}"
            )
        return w1, w2

    def rows(self, start: int, stop: int, device: Device = None, cache: FactorCache | None = None) -> Tensor:
        w1, w2 = self.factors_w1_w2(device, cache)
        rows = rebuild.kron_rows(w1, w2, start, stop)
        width = _numel(self.weight_shape[1:])
        if _shape(rows) != (stop - start, width):  # docs/format.md#tv-kron-pad: never reshape a wrongly padded kron
            raise AdapterShapeError(
                f"{where(self.source, self.name)}Kronecker rows have shape {_fmt(_shape(rows))}, "
                f"expected {_fmt((stop - start, width))}"
            )
        return rows


@dataclass(eq=False)
class LoraUpdate(LayerUpdate):
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

    def _sliced_factors(self, start: int, stop: int) -> dict[str, Tensor]:
        return {**self.factors, "lora_up.weight": self.factors["lora_up.weight"][start:stop]}

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

    def rows(self, start: int, stop: int, device: Device = None, cache: FactorCache | None = None) -> Tensor:
        def stored(key: str) -> Tensor | None:
            return self.float_factor(key, device, cache)

        return rebuild.lora_product(stored("lora_up.weight"), stored("lora_down.weight"), stored("lora_mid.weight"),
                                    start, stop)


@dataclass(eq=False)
class DiffUpdate(LayerUpdate):
    """A full ΔW (``diff``) and optional bias delta (``diff_b``), LyCORIS ``algo=full``."""

    kind: ClassVar[str] = "full"
    uses_alpha: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _need(self.name, self.source, self.factors, "diff")
        bias = self.factors.get("diff_b")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != self.factors["diff"].shape[0]):
            raise AdapterShapeError(
                f"{where(self.source, self.name)}diff_b has shape {_fmt(_shape(bias))}; the bias delta of a layer "
                f"with {self.factors['diff'].shape[0]} outputs is ({self.factors['diff'].shape[0]},)"
            )

    @property
    def rank(self) -> None:
        return None

    def _sliced_factors(self, start: int, stop: int) -> dict[str, Tensor]:
        return {key: value[start:stop] for key, value in self.factors.items()}  # diff, diff_b

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return _shape(self.factors["diff"])

    def _factor_bound(self) -> float:
        return bound_product(max(_abs_max(t) for t in self.factors.values()))  # diff, and diff_b for the bias

    def rows(self, start: int, stop: int, device: Device = None, cache: FactorCache | None = None) -> Tensor:
        diff = self.factors["diff"]
        return diff.reshape(diff.shape[0], -1)[start:stop].to(device=device, dtype=torch.float32, copy=True)

    @property
    def has_bias_delta(self) -> bool:
        return "diff_b" in self.factors

    def bias_delta(self, device: Device = None) -> Tensor | None:
        bias = self.factors.get("diff_b")
        if bias is None:
            return None
        return bias.to(device=device, dtype=torch.float32, copy=True).mul_(self.scale)


@dataclass(eq=False)
class RowsOfUpdate(LayerUpdate):
    """An update whose rows land elsewhere on its layer: rows ``src:src+n`` of ``inner`` go to rows
    ``dst:dst+n`` of the layer for each ``(src, dst, n)`` of ``moves()``; other rows get nothing.
    Scale, rank and bound are the inner update's (docs/names-and-blocks.md#fused-and-split-layers)."""

    inner: LayerUpdate | None = None

    def __post_init__(self) -> None:
        self.kind = self.inner.kind  # type: ignore[misc]  # reported as the algorithm it moves

    @classmethod
    def _around(cls, inner: LayerUpdate, dora_scale: Tensor | None, **fields) -> RowsOfUpdate:
        return cls(name=inner.name, factors=inner.factors, alpha=inner.alpha, dora_scale=dora_scale,
                   scalar=inner.scalar, source=inner.source, dora_prefer_output=inner.dora_prefer_output,
                   inner=inner, **fields)

    def moves(self) -> tuple[tuple[int, int, int], ...]:
        raise NotImplementedError

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def scale(self) -> float:
        return self.inner.scale

    @property
    def tucker(self) -> bool:
        return self.inner.tucker

    def _factor_bound(self) -> float:
        return self.inner.update_bound()

    def rows(self, start: int, stop: int, device: Device = None, cache: FactorCache | None = None) -> Tensor:
        out = torch.zeros(stop - start, self.in_features, dtype=torch.float32, device=device)
        for src, dst, n in self.moves():
            lo, hi = max(start, dst), min(stop, dst + n)
            if lo < hi:
                out[lo - start:hi - start] = self.inner.rows(src + lo - dst, src + hi - dst, device, cache)
        return out

    @property
    def has_bias_delta(self) -> bool:
        return self.inner.has_bias_delta

    def bias_delta(self, device: Device = None) -> Tensor | None:
        inner = self.inner.bias_delta(device)
        if inner is None:
            return None
        out = torch.zeros(self.weight_shape[0], dtype=torch.float32, device=inner.device)
        for src, dst, n in self.moves():
            out[dst:dst + n] = inner[src:src + n]
        return out


@dataclass(eq=False)
class PlacedUpdate(RowsOfUpdate):
    """``inner`` on rows ``start:start + inner.out_features`` of a larger layer of ``layer_shape``, as if
    they were a layer of their own (its DoRA norms are over those rows only): a file module for one
    of diffusers' split projections on a model that fuses them (``to_q`` into a fused ``qkv``).
    ``apply.patch`` patches the rows view; ``rows`` here pads with zeros, for inspection only."""

    start: int = 0
    layer_shape: tuple[int, ...] = ()

    @classmethod
    def of(cls, inner: LayerUpdate, start: int, layer_shape: tuple[int, ...]) -> PlacedUpdate:
        return cls._around(inner, inner.dora_scale, start=start, layer_shape=tuple(layer_shape))

    @property
    def stop(self) -> int:
        return self.start + self.inner.out_features

    def moves(self) -> tuple[tuple[int, int, int], ...]:
        return ((0, self.start, self.inner.out_features),)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.layer_shape

    def check_target(self, weight_shape: tuple[int, ...]) -> str | None:
        if tuple(weight_shape) != self.layer_shape:
            return (f"it patches rows {self.start}:{self.stop} of a {_fmt(self.layer_shape)} weight, "
                    f"not {_fmt(weight_shape)}")
        return self.inner.check_target((self.inner.out_features, *self.layer_shape[1:]))


@dataclass(eq=False)
class ReorderedUpdate(RowsOfUpdate):
    """``inner`` on its own layer with its row blocks in another order (``row_moves``, together a
    permutation): the final modulation's two halves, which the original and diffusers order
    differently. An input-axis DoRA is exact here: column norms do not depend on the row order."""

    row_moves: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def of(cls, inner: LayerUpdate, moves: list[tuple[int, int, int]]) -> ReorderedUpdate:
        magnitude = inner.dora_scale
        if magnitude is not None and inner.dora_axis(inner.weight_shape) == "out":
            rows = magnitude.reshape(magnitude.shape[0], -1)
            order = sorted(moves, key=lambda move: move[1])
            magnitude = torch.cat([rows[src:src + n] for src, _, n in order]).reshape(magnitude.shape)
        return cls._around(inner, magnitude, row_moves=tuple(moves))

    def moves(self) -> tuple[tuple[int, int, int], ...]:
        return self.row_moves

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return self.inner.weight_shape


UPDATE_CLASSES: dict[str, type[LayerUpdate]] = {
    cls.kind: cls for cls in (LohaUpdate, LokrUpdate, LoraUpdate, DiffUpdate)
}
