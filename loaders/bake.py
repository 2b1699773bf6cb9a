"""``lohakr bake``: adapters merged into a copy of a diffusers model folder or of an SD1.x/SDXL
single-file checkpoint, tensor by tensor (docs/architecture.md#baking).

The base is never loaded as a model: its components are built on the meta device from their
configs (for the layout: names, shapes, blocks), every adapter is planned against that layout as a
live load would be (the same refusals, before anything is written), and each weight file is then
streamed: a tensor no adapter touches is copied byte for byte, a touched one is read from the
memory-mapped base, patched by ``apply.patch`` with the contributions in ``contributions_by_layer``
order, and written. The values are therefore the bits ``pipe.load_lycoris`` + ``save_pretrained``
give. Memory: about one layer and its float32 working rows, plus the page cache. The output is
written into a temporary folder beside it and renamed into place when complete: a killed bake
leaves no partial output, and the base is never written.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import apply
from .adapter import load_adapter
from .apply import Contribution, Workspace
from .diffusers_pipeline import component_strengths
from .errors import LohakrError
from .families import family_of
from .guard import check_layer
from .names import LayerTarget, ModelLayout
from .patcher import PatchedAdapter, contributions_by_layer
from .plan import plan_load
from .report import LoadReport
from .sources import TORCH_DTYPES, SafetensorsFile, SourceIndex
from .stored import StoredTensor

COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class BakeAdapter:
    """One adapter to bake: its file, its strength (all components, or per component) and block weights."""

    path: str
    strength: float | Mapping[str, float] = 1.0
    block_weights: str | None = None

    @classmethod
    def parse(cls, spec: str) -> BakeAdapter:
        """``FILE[:STRENGTH[:BLOCKWEIGHTS]]``; a path may itself hold ``:`` (the strength is the last
        part that reads as a number)."""
        parts = spec.split(":")
        for index in range(len(parts) - 1, 0, -1):
            try:
                strength = float(parts[index])
            except ValueError:
                continue
            return cls(":".join(parts[:index]), strength, ":".join(parts[index + 1:]) or None)
        return cls(spec)


@dataclass
class BakeResult:
    """What a bake did: the reports of the adapters, and the tensors written."""

    output: str
    reports: list[LoadReport]
    patched: int = 0
    copied: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [report.summary() for report in self.reports]
        lines.append(f"{self.patched} tensors patched, {self.copied} copied, {self.bytes_written / 2**30:.2f} GiB "
                     f"in {len(self.files)} weight files, {self.seconds:.1f} s -> {self.output}")
        for report in self.reports:
            lines += [f"  warning: {w}" for w in report.warnings]
        return "\n".join(lines)


def bake(base: str | os.PathLike, adapters: Iterable[BakeAdapter | str], output: str | os.PathLike, *,
         strict: bool = False, allow_base_mismatch: bool = False,
         progress: Callable[[Iterable, int], Iterable] | None = None) -> BakeResult:
    """Bake ``adapters`` into a copy of ``base``, written to ``output`` (which must not exist yet):
    a diffusers model folder (unet/ or a transformer/, text_encoder/…: a folder out), or an SD1.x/SDXL single-file
    checkpoint with original SGM keys (a file out, in the same keys). Raises before writing anything
    if an adapter does not fit (the same refusals as ``pipe.load_lycoris``) or would write NaN/inf."""
    started = time.perf_counter()
    base_path, out_path = Path(base).resolve(), Path(output).resolve()
    if not base_path.exists():
        raise LohakrError(f"{base_path}: no such model folder or checkpoint file")
    if out_path == base_path or base_path in out_path.parents:
        raise LohakrError(f"{out_path}: the output would be written into the base model {base_path}; "
                          "choose another path")
    if out_path.exists():
        kind = "folder" if base_path.is_dir() else "file"
        raise LohakrError(f"{out_path}: already exists; bake writes a new {kind} (remove it or choose another path)")
    if base_path.is_dir():
        components = meta_components(base_path)
        layout = _folder_layout(components)
        sources = SourceIndex(components, {name: base_path / name for name in components})
        files, locate = sources.files, sources.locate
    else:
        checkpoint = SafetensorsFile(base_path)
        layout = ModelLayout.from_checkpoint({key: tuple(t.shape) for key, t in checkpoint.tensors.items()})
        if not layout.targets:
            raise LohakrError(f"{base_path}: no SD1.x/SDXL layers under the original checkpoint keys "
                              "(model.diffusion_model.…); bake takes such a checkpoint or a diffusers model folder")
        files, locate = [checkpoint], functools.partial(_checkpoint_tensor, checkpoint)
    entries, reports = _plans(adapters, layout, strict, allow_base_mismatch)
    index = contributions_by_layer(entries)
    writes = _planned_writes(layout, locate, index)
    _check_all(files, writes, index)  # every layer checked by the write guard before the first byte is written
    result = BakeResult(str(out_path), reports)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    workspace = Workspace()
    # One output buffer for every patched tensor, the largest's size: a new tensor per layer would
    # be fresh memory each time (mapped and faulted in anew: several times slower than the writes).
    largest = max((w.stored.stop - w.stored.start for keys in writes.values() for w in keys.values()), default=0)
    scratch = torch.empty(largest, dtype=torch.uint8)
    if base_path.is_file():
        handle, temporary = tempfile.mkstemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent)
        os.close(handle)
        try:
            _write_file(files[0], Path(temporary), writes.get(files[0].path, {}), index, workspace, scratch, result,
                        progress)
            os.replace(temporary, out_path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        result.files.append(out_path.name)
    else:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.partial-", dir=out_path.parent))
        try:
            _copy_tree(base_path, staging, skip={Path(f.path) for f in files})
            for file in files:
                relative = Path(file.path).relative_to(base_path)
                _write_file(file, staging / relative, writes.get(file.path, {}), index, workspace, scratch, result,
                            progress)
                result.files.append(str(relative))
            os.replace(staging, out_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    result.seconds = time.perf_counter() - started
    return result


def _plans(adapters: Iterable[BakeAdapter | str], layout: ModelLayout, strict: bool,
           allow_base_mismatch: bool) -> tuple[list[PatchedAdapter], list[LoadReport]]:
    """Every adapter planned on ``layout`` as a live load plans it (the same refusals), in stack order."""
    entries, reports = [], []
    for order, spec in enumerate(adapters, 1):
        spec = BakeAdapter.parse(spec) if isinstance(spec, str) else spec
        adapter = load_adapter(spec.path)
        strengths = component_strengths(spec.strength, None)
        name = adapter.name if adapter.name not in {e.name for e in entries} else f"{adapter.name}_{order}"
        plan = plan_load(adapter, layout, name=name, block_weights=spec.block_weights, strengths=strengths,
                         strict=strict, allow_base_mismatch=allow_base_mismatch)
        entries.append(PatchedAdapter(name, plan.matches, plan.report, strengths, plan.block_weights, order))
        reports.append(plan.report)
    return entries, reports


def _checkpoint_tensor(checkpoint: SafetensorsFile, target: LayerTarget,
                       parameter: str = "weight") -> tuple[SafetensorsFile, str] | None:
    """A single-file checkpoint's tensor of a layer: its host key (``…weight``, OpenCLIP's
    ``…in_proj_weight``), or the bias beside it."""
    key = target.host_key if parameter == "weight" else target.host_key[:-len("weight")] + "bias"
    return (checkpoint, key) if key in checkpoint.tensors else None


def meta_components(folder: Path) -> dict[str, nn.Module]:
    """The folder's UNet or transformer and its text encoders, built on the meta device from their
    configs (the classes the configs name)."""
    import diffusers
    import transformers

    built = {}
    with torch.device("meta"):
        for name in ("unet", "transformer"):
            if (folder / name / "config.json").is_file():
                config = json.loads((folder / name / "config.json").read_text(encoding="utf-8"))
                model_class = getattr(diffusers, config.get("_class_name", ""), None)
                if model_class is None:
                    raise LohakrError(f"{folder / name}: its config names {config.get('_class_name')!r}, which this "
                                      "diffusers does not have")
                built[name] = model_class.from_config(model_class.load_config(folder / name))
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if (folder / name / "config.json").is_file():
                config = transformers.AutoConfig.from_pretrained(folder / name)
                architecture = (config.architectures or ["CLIPTextModel"])[0]
                built[name] = getattr(transformers, architecture)(config)
    if not {"unet", "transformer", "text_encoder"} & set(built):
        raise LohakrError(f"{folder}: no unet/, transformer/ or text_encoder/ with a config.json; bake needs a "
                          "diffusers model folder")
    return built


def _folder_layout(components: dict[str, nn.Module]) -> ModelLayout:
    transformer = components.get("transformer")
    if transformer is None:
        return ModelLayout.from_diffusers(**{c: components.get(c) for c in ("unet", "text_encoder", "text_encoder_2")})
    family = family_of(transformer)
    if family is None:
        raise LohakrError(f"the transformer is a {type(transformer).__name__}, which lohakr has no layout for")
    return ModelLayout.from_transformer(transformer, family, components)


@dataclass
class _Write:
    """One tensor of a base file to patch: a layer's weight, or its bias (diff_b)."""

    target: LayerTarget
    parameter: str
    stored: StoredTensor


def _planned_writes(layout: ModelLayout, locate: Callable[[LayerTarget, str], tuple[SafetensorsFile, str] | None],
                    index: Mapping[str, list[Contribution]]) -> dict[str, dict[str, _Write]]:
    """Per base file, per key, the tensors to patch; a touched layer whose weight no file holds
    is an error (nothing is written)."""
    writes: dict[str, dict[str, _Write]] = {}
    for key, contributions in index.items():
        target = layout.targets[key]
        parameters = ["weight"] + (["bias"] if any(u.has_bias_delta for u, _ in contributions) else [])
        for parameter in parameters:
            found = locate(target, parameter)
            if found is None:
                if parameter == "bias":
                    continue  # no bias in the model: reported at plan time, as in a live load
                raise LohakrError(f"{key}: no tensor for this layer's {parameter} in the base model's files")
            file, tensor_key = found
            writes.setdefault(file.path, {})[tensor_key] = _Write(target, parameter, file.tensors[tensor_key])
    return writes


def _check_all(files: list[SafetensorsFile], writes: Mapping[str, Mapping[str, _Write]],
               index: Mapping[str, list[Contribution]]) -> None:
    workspace = Workspace()
    for file in files:
        for key, write in writes.get(file.path, {}).items():
            if write.parameter == "weight":
                original = file.view(key).view(write.target.weight_shape)
                check_layer(write.target.key, original, original, index[write.target.key], workspace)


def _write_file(source: SafetensorsFile, destination: Path, writes: Mapping[str, _Write],
                index: Mapping[str, list[Contribution]], workspace: Workspace, scratch: torch.Tensor,
                result: BakeResult, progress) -> None:
    """``source`` rewritten to ``destination`` in the same key order, dtypes, shapes and metadata,
    the tensors of ``writes`` patched, every other one copied byte for byte."""
    ordered = sorted(source.tensors.items(), key=lambda item: item[1].start)
    header: dict = {}
    if source.metadata:
        header["__metadata__"] = source.metadata
    offset = 0
    for key, stored in ordered:
        size = stored.stop - stored.start
        header[key] = {"dtype": stored.dtype, "shape": list(stored.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    destination.parent.mkdir(parents=True, exist_ok=True)
    items = progress(ordered, len(ordered)) if progress else ordered
    with open(source.path, "rb") as reader, open(destination, "wb") as writer:
        writer.write(len(text).to_bytes(8, "little"))
        writer.write(text)
        for key, stored in items:
            write = writes.get(key)
            if write is None:
                _copy_range(reader, writer, stored.start, stored.stop - stored.start)
                result.copied += 1
            else:
                writer.write(_patched_bytes(source, key, write, index[write.target.key], workspace, scratch))
                result.patched += 1
        result.bytes_written += writer.tell()


def _patched_bytes(source: SafetensorsFile, key: str, write: _Write, contributions: list[Contribution],
                   workspace: Workspace, scratch: torch.Tensor) -> memoryview:
    """The patched tensor's bytes, built in ``scratch`` (valid until the next call)."""
    original = source.view(key, populate=True)
    dtype = TORCH_DTYPES[write.stored.dtype]
    if write.parameter == "weight":
        original = original.view(write.target.weight_shape)
        patched = scratch[:write.stored.stop - write.stored.start].view(dtype).view(original.shape)
        apply.patch(patched, original, contributions, workspace)
    else:  # the bias, as a live load writes it
        work = apply.patched_bias(original, contributions)
        patched = original if work is None else work.to(dtype)
    return memoryview(patched.contiguous().view(torch.uint8).numpy()).cast("B")


def _copy_range(reader, writer, start: int, length: int) -> None:
    """Bytes ``start:start+length`` of ``reader`` appended to ``writer``: in the kernel where it can
    (``os.copy_file_range``), else through a buffer."""
    writer.flush()
    copy = getattr(os, "copy_file_range", None)
    while length > 0 and copy is not None:
        try:
            done = copy(reader.fileno(), writer.fileno(), min(length, 1 << 30), start)
        except OSError:
            break
        if done <= 0:
            break
        start, length = start + done, length - done
    if length > 0:
        reader.seek(start)
        while length > 0:
            block = reader.read(min(length, COPY_CHUNK))
            if not block:
                raise LohakrError(f"{reader.name}: ended early while being copied; the file may be truncated")
            writer.write(block)
            length -= len(block)
    writer.seek(0, os.SEEK_END)


def _copy_tree(base: Path, destination: Path, skip: set[Path]) -> None:
    """Every file of ``base`` but those in ``skip`` (the weight files, rewritten) copied over."""
    for root, _, files in os.walk(base):
        for name in files:
            path = Path(root) / name
            if path.resolve() in skip:
                continue
            target = destination / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


