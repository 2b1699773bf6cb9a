"""The kept originals of patched weights: where they are kept, and putting them back bit for bit.

Where an original stays on its weight's own device it is not copied at all: the parameter keeps
its ``Parameter`` object but gets new storage for the patched values, and the old storage *is*
the kept original (restoring swaps it back). Where originals go elsewhere (a GPU model with
originals on the CPU) they are copied, and the parameter is then patched in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .apply import restore, shares_memory
from .names import LayerTarget

# "auto" keeps originals on the GPU only when this much GPU memory stays free afterwards: the larger
# of 4 GiB and a fifth of the card (room for SDXL activations and the VAE decode).
AUTO_GPU_MARGIN_BYTES = 4 << 30
AUTO_GPU_MARGIN_FRACTION = 0.2


@dataclass(eq=False)
class Original:
    """One layer's original weight (and bias), as kept."""

    target: LayerTarget
    weight: Tensor
    bias: Tensor | None


class OriginalStore:
    """The originals of every weight an adapter touches, kept once each, under a placement policy
    (``originals_placement``)."""

    def __init__(self, policy: str | torch.device | None = "auto"):
        self.policy = policy
        self._kept: dict[str, Original] = {}

    def get(self, key: str) -> Original | None:
        return self._kept.get(key)

    def keep(self, targets: list[LayerTarget]) -> None:
        """Keep the originals of ``targets`` not kept yet (refusing weights on the meta device)."""
        new = [t for t in targets if t.key not in self._kept]
        refuse_meta(new)
        placement = originals_placement(self.policy, [layer_of(t).weight for t in new])
        for target in new:
            layer = layer_of(target)
            weight = layer.weight.detach()
            device = placement[weight.device]
            bias = getattr(layer, "bias", None)
            self._kept[target.key] = Original(
                target,
                weight if device == weight.device else weight.to(device, copy=True),
                None if bias is None else bias.detach().to(device, copy=device != bias.device),
            )

    def put_back(self, target: LayerTarget) -> None:
        """Give ``target`` its original weight and bias back, bit for bit, and forget them."""
        kept = self._kept.pop(target.key)
        layer = layer_of(target)
        restore(layer.weight, kept.weight)
        if kept.bias is not None:
            restore(layer.bias, kept.bias)

    def forget_unpatched(self, targets: list[LayerTarget], still_touched: set[str]) -> None:
        """Forget the originals of ``targets`` that no adapter touches any more and that were never
        patched (the live weight still is the original): nothing to put back."""
        for target in targets:
            kept = self._kept.get(target.key)
            if kept is not None and target.key not in still_touched and shares_memory(layer_of(target).weight,
                                                                                       kept.weight):
                del self._kept[target.key]

    @property
    def kept_bytes(self) -> int:
        """Bytes held by originals that are copies or swapped-out storage."""
        return sum(_nbytes(o.weight) + (_nbytes(o.bias) if o.bias is not None else 0) for o in self._kept.values())

    def __len__(self) -> int:
        return len(self._kept)

    def items(self):
        """``(layer key, Original)`` pairs, for inspection."""
        return self._kept.items()

    def values(self):
        return self._kept.values()


def originals_placement(policy: str | torch.device | None, weights: list[Tensor]) -> dict[torch.device, torch.device]:
    """Where to keep the originals of ``weights``, per weight device: ``"auto"`` beside the weight
    on a CPU, or on a GPU that keeps a safe margin free, else on the CPU; ``"cpu"`` (or any device)
    there; ``None`` always beside the weight."""
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


def refuse_meta(targets: list[LayerTarget]) -> None:
    for target in targets:
        if layer_of(target).weight.device.type == "meta":
            raise ValueError(
                f"{target.key}: the weight is on the meta device (sequential CPU offload or an "
                "unloaded model); load adapters before enable_sequential_cpu_offload()"
            )


def layer_of(target: LayerTarget) -> nn.Module:
    if target.layer is None:
        raise ValueError(f"{target.key}: this layout has no live layer to patch")
    return target.layer


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
