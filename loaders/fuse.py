"""``fuse=True``: an adapter added into the live weights for good, keeping nothing.

``W ← cast(W + Σ μ·s·R)`` in place, what LyCORIS' merge does (with the right scale), using no memory
beyond a row block. The whole adapter is checked by the write guard before the first layer is
written; a failure after that raises ``FusedPartlyError``, since nothing was kept to undo it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from . import apply
from .apply import Contribution, Workspace
from .errors import FusedPartlyError
from .guard import check_layer
from .names import LayerTarget
from .originals import layer_of, refuse_meta


def fuse_into_weights(name: str, targets: Sequence[LayerTarget], contributions: Mapping[str, list[Contribution]],
                      progress: Callable[[Iterable], Iterable] | None = None) -> None:
    """Add ``contributions`` (per target key) into the live weights of ``targets`` in place."""
    refuse_meta(list(targets))
    workspace = Workspace()
    for target in targets:
        weight = layer_of(target).weight.detach()
        check_layer(target.key, weight, weight, contributions[target.key], workspace)
    done = 0
    try:
        with torch.no_grad():
            for target in progress(targets) if progress else targets:
                layer = layer_of(target)
                weight = layer.weight.detach()
                apply.patch(weight, weight, contributions[target.key], workspace)
                bias = getattr(layer, "bias", None)
                if bias is not None:
                    apply.write_bias(layer, bias.detach(), contributions[target.key], in_place=True)
                done += 1
    except BaseException as err:
        if done:
            raise FusedPartlyError(
                f"fusing {name!r} failed after {done} of {len(targets)} layers ({err}); those layers are "
                "changed and nothing was kept to undo it: reload the model"
            ) from err
        raise
