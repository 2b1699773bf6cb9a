"""The kept originals of patched weights: where they are kept, and putting them back bit for bit
(docs/architecture.md#originals-in-files).

Four places, chosen per weight:

- **mapped from its file** already: diffusers and transformers load safetensors weights as
  copy-on-write views of the memory-mapped file. Such a view is kept as the original (no copy: its
  pages are the file's page cache) and the patched values get new storage, as beside the weight
  below; writing in place would copy every page on first write, several times slower.

- **in the file** the weight was loaded from (``sources.FileTensor``), where a component came from
  safetensors files: nothing is kept in memory; the weight is patched in place, and a strength
  change or unload reads the original back from the file (``pread``, from the page cache) into the
  same storage, for a lone LoKr in the patch's own pass (``write_from_file``).
  Before the first in-place write the live weight is compared with the file's bytes; if it differs
  (cast, edited or moved since loading) its original is kept in memory instead, and the report says
  so. Before any later read the file's identity is checked (``SourceFileChangedError``).
- **beside the weight**, not copied at all: the parameter keeps its ``Parameter`` object but gets
  new storage for the patched values, and the old storage *is* the kept original (restoring swaps
  it back);
- **elsewhere** (a GPU model with originals on the CPU): copied, and the parameter is then patched
  in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import apply
from .apply import Contribution, Workspace, restore, shares_memory
from .names import LayerTarget
from .sources import FileTensor, MappedFile, SourceIndex, mapped_files, mapping_of

# "auto" keeps originals on the GPU only when this much GPU memory stays free afterwards: the larger
# of 4 GiB and a fifth of the card (room for SDXL activations and the VAE decode).
AUTO_GPU_MARGIN_BYTES = 4 << 30
AUTO_GPU_MARGIN_FRACTION = 0.2


@dataclass(eq=False)
class Original:
    """One layer's original weight (and bias), as kept."""

    target: LayerTarget
    weight: Tensor | None  # None while the original lives in ``file``
    bias: Tensor | None
    file: FileTensor | None = None
    written: bool = False  # a file original whose live weight was patched in place: the file is the only copy
    mapped: MappedFile | None = None  # ``weight`` is a view of this mapped file (page cache, not a copy)

    @property
    def place(self) -> str:
        """``file`` (read back from it), ``mapped`` (the file's pages, mapped by the model's loader),
        ``gpu`` or ``ram``: where the original is."""
        if self.file is not None:
            return "file"
        if self.mapped is not None:
            return "mapped"
        return "gpu" if self.weight.device.type == "cuda" else "ram"


class OriginalStore:
    """The originals of every weight an adapter touches, kept once each, under a placement policy
    (``originals_placement``)."""

    def __init__(self, policy: str | torch.device | None = "auto"):
        self.policy = policy
        self._kept: dict[str, Original] = {}
        self.notes: list[str] = []  # weights whose file original could not be used, and why

    def get(self, key: str) -> Original | None:
        return self._kept.get(key)

    def keep(self, targets: list[LayerTarget], sources: SourceIndex | None = None) -> None:
        """Keep the originals of ``targets`` not kept yet (refusing weights on the meta device): in
        their source file where ``sources`` knows it and the policy is ``"auto"``, else in memory."""
        new = [t for t in targets if t.key not in self._kept]
        refuse_meta(new)
        in_file, mapped = {}, {}
        if self.policy == "auto" and new:
            mappings = mapped_files() if any(layer_of(t).weight.device.type == "cpu" for t in new) else []
            for target in new:
                weight = layer_of(target).weight
                mapped_file = mapping_of(weight, mappings)
                if mapped_file is not None:  # already a view of its file: that view is the original
                    mapped[target.key] = mapped_file
                elif sources is not None and (found := sources.find(target, weight)) is not None:
                    in_file[target.key] = found
        placement = originals_placement(self.policy, [layer_of(t).weight for t in new
                                                      if t.key not in in_file and t.key not in mapped])
        for target in new:
            layer = layer_of(target)
            bias = getattr(layer, "bias", None)
            if target.key in in_file:  # the bias (small) stays beside it, as its own original
                self._kept[target.key] = Original(target, None, None if bias is None else bias.detach(),
                                                  in_file[target.key])
                continue
            weight = layer.weight.detach()
            device = placement.get(weight.device, weight.device)
            self._kept[target.key] = Original(
                target,
                weight if device == weight.device else weight.to(device, copy=True),
                None if bias is None else bias.detach().to(device, copy=device != bias.device),
                mapped=mapped.get(target.key),
            )

    def check_files(self, targets: list[LayerTarget]) -> None:
        """Raise ``SourceFileChangedError`` if a file holding the only copy of an original of ``targets``
        changed on disk: called before anything is written."""
        files = {}
        for target in targets:
            kept = self._kept.get(target.key)
            if kept is not None and kept.file is not None and kept.written:
                files[id(kept.file.file)] = kept.file.file
            elif kept is not None and kept.mapped is not None:
                files[id(kept.mapped)] = kept.mapped
        for file in files.values():
            file.check_unchanged()

    def original_values(self, target: LayerTarget) -> Tensor:
        """``target``'s original weight as a tensor to read (for the write guard): the kept copy, the
        live weight while a file original was not written yet, or the file's view."""
        kept = self._kept[target.key]
        if kept.file is None:
            return kept.weight
        return kept.file.view() if kept.written else layer_of(target).weight.detach()

    def source_for_write(self, target: LayerTarget) -> Tensor:
        """The original to patch ``target`` from, on the weight's device. A file original not yet
        written is first compared with the file, byte for byte: if equal, the live weight itself is
        the source (in place) and the file is the original from now on; if not, the live weight is
        kept in memory as the original instead, as without a file, and a note says why."""
        kept = self._kept[target.key]
        live = layer_of(target).weight.detach()
        if kept.file is None:
            return kept.weight if kept.weight.device == live.device else kept.weight.to(live.device)
        if kept.written:  # the original back into the weight's own storage, then patched in place
            kept.file.read_into(live)
            return live
        if kept.file.equals(live):
            kept.written = True
            return live
        self._keep_in_memory(kept, live)
        return kept.weight if kept.weight.device == live.device else live

    def write_from_file(self, target: LayerTarget, contributions: list[Contribution], workspace: Workspace) -> bool:
        """Write a weight whose original is in its file in one native pass that reads the original
        as it patches (``apply.patch_from_file``), where one fits: True when done. On the first
        write the pass also checks the weight against the file; the file is the original from then
        on. False when the caller is to write it the usual way (``source_for_write``): no such pass
        fits, or the weight differs from the file and its original is now kept in memory (with a
        note)."""
        kept = self._kept[target.key]
        live = layer_of(target).weight.detach()
        if kept.file is None or live.device.type != "cpu":
            return False
        location = kept.file.location()
        if location is None:
            return False
        with kept.file.file.reading():
            outcome = apply.patch_from_file(live, location, contributions, not kept.written, workspace)
        if outcome is None:
            return False
        if outcome:
            kept.written = True
            return True
        self._keep_in_memory(kept, live)
        return False

    def _keep_in_memory(self, kept: Original, live: Tensor) -> None:
        """A file original whose live weight no longer equals the file: the live weight is the
        original from now on, kept in memory as without a file; a note says why."""
        self.notes.append(f"{kept.target.key}: the weight differs from {kept.file.file.path} [{kept.file.key}] "
                          "(cast, edited or moved since loading), so its original is kept in memory")
        device = originals_placement(self.policy, [live])[live.device]
        kept.weight = live if device == live.device else live.to(device, copy=True)
        kept.file = None

    def put_back(self, target: LayerTarget) -> None:
        """Give ``target`` its original weight and bias back, bit for bit, and forget them."""
        kept = self._kept.pop(target.key)
        layer = layer_of(target)
        if kept.file is not None:
            if kept.written:
                kept.file.read_into(layer.weight.detach())
        else:
            restore(layer.weight, kept.weight)
        if kept.bias is not None:
            restore(layer.bias, kept.bias)

    def forget_unpatched(self, targets: list[LayerTarget], still_touched: set[str]) -> None:
        """Forget the originals of ``targets`` that no adapter touches any more and that were never
        patched (the live weight still is the original): nothing to put back."""
        for target in targets:
            kept = self._kept.get(target.key)
            if kept is None or target.key in still_touched:
                continue
            unpatched = not kept.written if kept.file is not None else shares_memory(layer_of(target).weight,
                                                                                      kept.weight)
            if unpatched:
                del self._kept[target.key]

    @property
    def kept_bytes(self) -> int:
        """Bytes held in memory by originals that are copies or swapped-out storage (originals in
        files, read back or mapped, hold none but their small bias)."""
        return sum((_nbytes(o.weight) if o.place in ("ram", "gpu") else 0) + (_nbytes(o.bias) if o.bias is not None
                                                                               else 0) for o in self._kept.values())

    def summary(self) -> dict[str, dict]:
        """Where the originals are: per place (``file``, ``ram``, ``gpu``) the layers and the bytes
        (held in memory; for ``file``, read back from disk), and the files."""
        places: dict[str, dict] = {}
        for kept in self._kept.values():
            entry = places.setdefault(kept.place, {"layers": 0, "bytes": 0})
            entry["layers"] += 1
            entry["bytes"] += kept.file.nbytes if kept.file is not None else _nbytes(kept.weight)
            path = kept.file.file.path if kept.file is not None else kept.mapped.path if kept.mapped else None
            if path is not None:
                files = entry.setdefault("files", [])
                if path not in files:
                    files.append(path)
        return places

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
