"""The write guard: no layer is ever written with a NaN or inf that the adapter put there.

Before any weight changes, every (weight, contributions) pair of a load, strength change or
unload is checked:

1. Cheaply, from the factors alone (``LayerUpdate.update_bound``): when
   ``Σ |strength · scale| · bound`` stays below half the weight dtype's largest value, the patched
   weight is finite for any model weight within the other half (every trained model's are). This
   costs no pass over the weight, and every real adapter passes it.
2. Otherwise (huge factors, an extreme strength, DoRA, whose rescale depends on the weight), the
   patched layer is built once in a scratch tensor and looked at; the host's real write follows
   only if it is finite.

A refusal raises ``NonFiniteUpdateError`` naming the file, the module, the layer and the cause
(factor overflow, alpha, stored scalar, strength), and nothing has been written.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .apply import Contribution, Workspace, patch
from .errors import LohakrError, NonFiniteUpdateError, where
from .updates import FLOAT32_SAFE


def check_strength(value: object, what: str = "strength") -> float:
    """A user's strength as a float; refuses NaN, inf and non-numbers at the API boundary."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LohakrError(f"{what} is {value!r}; a strength is a finite number such as 1.0")
    number = float(value)
    if not math.isfinite(number):
        raise LohakrError(f"{what} is {number}; a strength is a finite number such as 1.0 (NaN or inf would "
                          "turn the patched weights into NaN)")
    return number


def dtype_limit(dtype: torch.dtype) -> float:
    """Half the largest finite value of ``dtype`` (float32's for non-float dtypes)."""
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.finfo(torch.float32)
    return min(info.max / 2, FLOAT32_SAFE)


def provably_finite(contributions: Sequence[Contribution], dtype: torch.dtype) -> bool:
    """True when the factors alone prove that patching a weight of ``dtype`` by ``contributions``
    writes only finite values (step 1 of the module docstring)."""
    total = 0.0
    for module, strength in contributions:
        if module.dora:
            return False
        total += abs(strength * module.scale) * module.update_bound()
        if not total <= dtype_limit(dtype):  # also NaN
            return False
    return True


def check_patch(contributions: Sequence[Contribution], dtype: torch.dtype, layer: str,
                build: Callable[[], Tensor]) -> None:
    """Refuse a patch that would write a non-finite value. ``build()`` returns the patched layer in
    ``dtype`` (a scratch copy, never the live weight); it is called only when the factors alone
    cannot prove the patch finite."""
    contributions = [(m, s) for m, s in contributions if s != 0]
    if not contributions or provably_finite(contributions, dtype):
        return
    if any(not abs(strength * module.scale) <= FLOAT32_SAFE for module, strength in contributions):
        raise NonFiniteUpdateError(_diagnose(contributions, dtype, layer))  # float32 cannot hold the multiplier
    trial = build()
    if bool(torch.isfinite(trial).all()):
        return
    raise NonFiniteUpdateError(_diagnose(contributions, dtype, layer))


def _diagnose(contributions: Sequence[Contribution], dtype: torch.dtype, layer: str) -> str:
    """The message for a refused layer: the module at fault and why."""
    limit = dtype_limit(dtype) * 2
    for module, strength in contributions:
        context = where(module.source, module.name)
        if not math.isfinite(strength):
            cause = f"the strength is {strength}"
        elif not math.isfinite(module.scale) or abs(module.scale) > FLOAT32_SAFE:
            cause = f"its scale {module.scale:g} (alpha {module.alpha}, scalar {module.scalar}) is out of range"
        elif not abs(strength * module.scale) <= FLOAT32_SAFE:
            cause = f"the strength {strength:g} times the scale {module.scale:g} is beyond float32's range"
        elif not math.isfinite(module.update_bound()):
            largest = max(float(t.abs().amax()) for t in module.factors.values())
            cause = f"factor overflow: its factors (largest |value| {largest:g}) multiply beyond float32's range"
        else:
            continue
        return f"{context}patching {layer} would write NaN/inf: {cause}. Nothing was written"
    modules = ", ".join(where(m.source, m.name).rstrip(": ") for m, _ in contributions)
    strengths = ", ".join(f"{s:g}" for _, s in contributions)
    return (f"{modules}: patching {layer} at strength {strengths} would write NaN/inf: the patched values leave "
            f"{str(dtype).replace('torch.', '')}'s range (±{limit:g}) or DoRA's norm degenerates. Lower the "
            "strength, or check the file. Nothing was written")


def check_layer(layer: str, original: Tensor, live: Tensor, contributions: Sequence[Contribution],
                workspace: Workspace | None = None) -> None:
    """``check_patch`` for one live weight: ``original`` patched by ``contributions`` must be finite
    in ``live``'s dtype. The trial, when one is needed, is built into a scratch tensor on ``live``'s
    device, never into the weight."""
    def trial() -> Tensor:
        out = torch.empty(live.shape, dtype=live.dtype, device=live.device)
        source = original if original.device == live.device else original.to(live.device)
        patch(out, source.contiguous(), contributions, workspace)
        return out

    check_patch(contributions, live.dtype, layer, trial)
