"""Where a model's weights came from: the safetensors files they were loaded from, so that the
original of a patched weight can live there instead of in memory (docs/architecture.md#originals-in-files).

A ``SourceIndex`` answers, for one patchable layer, which tensor of which file holds its weight as
it was loaded (``FileTensor``). Nothing here trusts that answer blindly: the patcher compares the
live weight with the file's bytes before the first in-place write, and checks each file's identity
(device, inode, size, modification time) before it reads an original back. The tensors are read
with ``pread`` straight from the page cache (``file_reads``), or viewed through a read-only memory
map where a caller needs a tensor (baking, a GPU weight).

Files are found from the components themselves (``from_pretrained`` records the folder it read:
``config._name_or_path``), or given by the user (``lohakr.enable(pipe, source_files=...)``), for
instance the single-file checkpoint a pipeline was made from with ``from_single_file`` (original
SGM keys).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import mmap
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import file_reads
from .errors import LohakrError, SourceFileChangedError
from .names import LayerTarget
from .stored import TORCH_DTYPE_NAMES, read_header, torch_dtype

TORCH_DTYPES = {name: torch_dtype(name) for name in TORCH_DTYPE_NAMES}  # None where this torch lacks one
# The files ``from_pretrained`` reads, in diffusers' and transformers' order of preference.
WEIGHT_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_FILE_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
# Key prefixes of each component inside a single-file (original SGM) checkpoint; the UNet's keys
# come from its SGM paths instead.
SINGLE_FILE_PREFIXES = {
    "text_encoder": ("conditioner.embedders.0.transformer.", "cond_stage_model.transformer."),
    "text_encoder_2": (),  # OpenCLIP: q/k/v fused into in_proj; its layers keep originals in memory
}
UNET_SINGLE_FILE_PREFIX = "model.diffusion_model."
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+


@dataclass(frozen=True)
class FileIdentity:
    """What says a file is still the one the weights were read from."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | int) -> FileIdentity:
        """Of the file at ``path``, or of an open descriptor."""
        stat = os.stat(path)
        return cls(stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class SafetensorsFile:
    """One safetensors file: its header, read once, and its tensors as zero-copy views of a private
    memory map (opened on first use)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(Path(path).resolve())
        self.identity = FileIdentity.of(self.path)
        with open(self.path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
        self.tensors, self.metadata = read_header(self.path, header_length, self.identity.size)
        self._map: mmap.mmap | None = None
        self._fd: int | None = None

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def check_unchanged(self) -> None:
        """Raise ``SourceFileChangedError`` if the file is not the one read at first (replaced, rewritten,
        truncated or gone)."""
        try:
            now = FileIdentity.of(self.path)
        except OSError as err:
            raise SourceFileChangedError(f"{self.path}: the file the model's original weights are read back from is "
                                    f"gone ({err.strerror}); the model was left as it is: reload it") from err
        if now != self.identity:
            raise SourceFileChangedError(
                f"{self.path}: the file the model was loaded from changed on disk since (size {self.identity.size} → "
                f"{now.size} bytes, or modified), so it no longer holds the original weights; the model was left as "
                "it is: reload the model to unload or re-weight adapters"
            )

    def read_into(self, key: str, out: Tensor) -> None:
        """Tensor ``key``'s bytes copied into ``out`` (its storage kept): ``pread`` from the page cache
        for a contiguous CPU tensor, else through the memory map."""
        if out.device.type == "cpu" and out.is_contiguous() and file_reads.available():
            self._check_size(key, out)
            with self.reading():
                file_reads.read_into(self._descriptor(), self.tensors[key].start, out)
            return
        with torch.no_grad():
            out.copy_(self.view(key, populate=True).view(out.shape))

    def equals(self, key: str, live: Tensor) -> bool:
        """True when ``live`` holds exactly tensor ``key``'s bytes (dtype, size and every bit)."""
        dtype = TORCH_DTYPES.get(self.tensors[key].dtype)
        if dtype != live.dtype or self.tensors[key].numel() != live.numel():
            return False
        if live.device.type == "cpu" and live.is_contiguous() and file_reads.available():
            with self.reading():
                return file_reads.equals(self._descriptor(), self.tensors[key].start, live)
        return file_reads.same_bytes(live, self.view(key).view(live.shape))

    def _check_size(self, key: str, tensor: Tensor) -> None:
        stored = self.tensors[key]
        if stored.stop - stored.start != tensor.numel() * tensor.element_size():
            raise ValueError(f"{self.path} [{key}]: {stored.stop - stored.start} bytes, not the tensor's "
                             f"{tensor.numel() * tensor.element_size()}")

    def _descriptor(self) -> int:
        """The file opened for ``pread`` once, checked to be the file whose header was read."""
        if self._fd is None:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if FileIdentity.of(fd) != self.identity:
                os.close(fd)
                self.check_unchanged()  # raises with the reason
                raise SourceFileChangedError(f"{self.path}: the file changed on disk while it was opened")
            self._fd = fd
        return self._fd

    def location(self, key: str) -> tuple[int, int] | None:
        """``(descriptor, offset)`` of tensor ``key`` for a native kernel that reads it with ``pread``
        (opened and checked once), or None where ``pread`` is not available."""
        return (self._descriptor(), self.tensors[key].start) if file_reads.available() else None

    @contextlib.contextmanager
    def reading(self):
        """Reads of this file inside the block: one cut shorter than its header says is a changed
        file, said as such."""
        try:
            yield
        except (file_reads.ShortReadError, EOFError) as err:
            raise SourceFileChangedError(f"{self.path}: {err}: the file was truncated since it was read; the "
                                         "model was left as it is: reload it") from err

    def view(self, key: str, populate: bool = False) -> Tensor:
        """Tensor ``key`` as a view of the file mapped read-only (a write would fault: nothing can
        change the file or this copy of it by mistake). ``populate``: map its pages in one call
        first (``MADV_POPULATE_READ``), instead of one page fault per few pages as it is read."""
        stored = self.tensors[key]
        dtype = TORCH_DTYPES.get(stored.dtype)
        if dtype is None:
            raise LohakrError(f"{self.path}: tensor {key!r} has dtype {stored.dtype}, which this torch cannot read")
        if self._map is None:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        count = stored.numel()
        if count == 0:
            return torch.empty(stored.shape, dtype=dtype)
        if populate:
            page_start = stored.start - stored.start % mmap.PAGESIZE
            with contextlib.suppress(OSError, ValueError):  # an older kernel: faulted in as read
                self._map.madvise(MADV_POPULATE_READ, page_start, stored.stop - page_start)
        with warnings.catch_warnings():  # torch warns that the buffer is read-only: that is the point
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(self._map, dtype=dtype, count=count, offset=stored.start).view(stored.shape)


@dataclass(frozen=True, eq=False)
class FileTensor:
    """One weight's original: tensor ``key`` of ``file``, viewed in the live weight's shape."""

    file: SafetensorsFile
    key: str
    shape: tuple[int, ...]

    def view(self, populate: bool = False) -> Tensor:
        return self.file.view(self.key, populate).view(self.shape)

    def location(self) -> tuple[int, int] | None:
        """``(descriptor, offset)`` of the original's bytes, for a kernel that reads them itself."""
        return self.file.location(self.key)

    def read_into(self, out: Tensor) -> None:
        """The original's bytes into ``out``, in place."""
        self.file.read_into(self.key, out)

    def equals(self, live: Tensor) -> bool:
        """True when ``live`` still holds exactly the original's bytes."""
        return self.file.equals(self.key, live)

    @property
    def nbytes(self) -> int:
        stored = self.file.tensors[self.key]
        return stored.stop - stored.start


@dataclass
class ComponentSource:
    """The files one component's weights were read from, and how its keys are spelled in them."""

    files: list[SafetensorsFile]
    single_file: bool = False  # original SGM keys (a from_single_file checkpoint) rather than the model's own
    keys: dict[str, SafetensorsFile] = field(init=False)

    def __post_init__(self) -> None:
        self.keys = {key: f for f in self.files for key in f.tensors}


class SourceIndex:
    """Per pipeline: for each component, the files its weights came from, found or given."""

    def __init__(self, components: Mapping[str, nn.Module],
                 given: str | os.PathLike | Iterable | Mapping | None = None,
                 opened: dict[str, SafetensorsFile] | None = None):
        """``given``: the user's ``source_files`` (raises ``LohakrError`` if a path is not there);
        without it, each component's files are found from what ``from_pretrained`` recorded.
        ``opened``: files read before, by path, reused while unchanged on disk."""
        self.components = dict(components)
        self.sources: dict[str, ComponentSource] = {}
        opened = {} if opened is None else opened
        for name, module in self.components.items():
            if given is not None:
                try:
                    paths, single = _given_paths(given, name)
                except OSError as err:
                    raise LohakrError(f"source_files: {err}; give the safetensors file(s) the pipeline was "
                                      "loaded from") from err
            else:
                paths, single = _found_paths(module), False
            if not paths:
                continue  # its originals stay in memory
            try:
                self.sources[name] = ComponentSource([_open(p, opened) for p in paths], single)
            except (OSError, LohakrError):
                if given is not None:
                    raise  # a found file that cannot be read: its originals stay in memory
        self._names: dict[str, dict[int, str]] = {}

    def find(self, target: LayerTarget, weight: Tensor) -> FileTensor | None:
        """The file tensor holding ``target``'s weight as loaded, when one has its dtype and size
        (shapes may differ, as a 1×1 conv stored as a linear weight): a candidate only; the patcher
        compares bytes before it relies on it."""
        found = self.locate(target, "weight")
        if found is None:
            return None
        file, key = found
        stored = file.tensors[key]
        if TORCH_DTYPES.get(stored.dtype) == weight.dtype and stored.numel() == weight.numel():
            return FileTensor(file, key, tuple(weight.shape))
        return None

    def locate(self, target: LayerTarget, parameter: str = "weight") -> tuple[SafetensorsFile, str] | None:
        """Which file and key hold ``target``'s ``weight`` (or ``bias``), by name alone."""
        source = self.sources.get(target.component)
        if source is None:
            return None
        for key in self._candidate_keys(target, source, parameter):
            file = source.keys.get(key)
            if file is not None:
                return file, key
        return None

    def _candidate_keys(self, target: LayerTarget, source: ComponentSource, parameter: str) -> list[str]:
        name = self._parameter_name(target, parameter)
        if name is None:
            return []
        bare = name.removeprefix("text_model.")
        variants = [name, bare, f"text_model.{bare}"]
        if not source.single_file:
            return variants
        if target.component == "unet":
            return [f"{UNET_SINGLE_FILE_PREFIX}{target.sgm_path}.{parameter}"] if target.sgm_path else []
        return [prefix + v for prefix in SINGLE_FILE_PREFIXES.get(target.component, ()) for v in variants[1:]]

    def _parameter_name(self, target: LayerTarget, parameter: str = "weight") -> str | None:
        """The parameter's name in its component's state dict (``encoder.layers.0.mlp.fc1.weight``)."""
        module = self.components.get(target.component)
        tensor = getattr(target.layer, parameter, None) if target.layer is not None else None
        if module is None or tensor is None:
            return None
        names = self._names.get(target.component)
        if names is None:
            names = self._names[target.component] = {id(p): n for n, p in module.named_parameters()}
        return names.get(id(tensor))

    @property
    def files(self) -> list[SafetensorsFile]:
        return list({id(f): f for s in self.sources.values() for f in s.files}.values())


def _open(path: str, opened: dict[str, SafetensorsFile]) -> SafetensorsFile:
    """The file at ``path``, reusing the one in ``opened`` while it is unchanged on disk."""
    resolved = str(Path(path).resolve())
    known = opened.get(resolved)
    if known is None or known.identity != FileIdentity.of(resolved):
        known = opened[resolved] = SafetensorsFile(resolved)
    return known


def _found_paths(module: nn.Module) -> list[str]:
    """The safetensors files ``from_pretrained`` read ``module`` from, if it recorded a local folder."""
    config = getattr(module, "config", None)
    folder = getattr(config, "_name_or_path", None) or getattr(module, "name_or_path", None)
    if not folder or not os.path.isdir(folder):
        return []
    return _files_in(folder)


def _files_in(folder: str) -> list[str]:
    for index_name in INDEX_FILE_NAMES:
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle).get("weight_map", {}).values()))
            return [os.path.join(folder, s) for s in shards if os.path.isfile(os.path.join(folder, s))]
    for name in WEIGHT_FILE_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
    return []


def _given_paths(given, component: str) -> tuple[list[str], bool]:
    """The user's ``source_files`` for ``component``: a single-file checkpoint (every component), a
    folder, a list of files, or a dict per component. A single ``.safetensors`` file given for the
    whole pipeline is read as an original SGM checkpoint."""
    if isinstance(given, Mapping):
        if component not in given:
            return [], False
        return _paths_of(given[component]), False
    paths = _paths_of(given)
    single = isinstance(given, (str, os.PathLike)) and os.path.isfile(given)
    return paths, single


def _paths_of(spec) -> list[str]:
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[str] = []
    for item in specs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = _files_in(item)
            if not found:
                raise FileNotFoundError(f"no safetensors weights in folder {item}")
            paths.extend(found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise FileNotFoundError(f"source file {item} does not exist")
    return paths


@dataclass(eq=False)
class MappedFile:
    """A file mapped into this process (as diffusers and transformers map safetensors files: the
    model's weights are copy-on-write views of it), by its address range. Its identity is read when
    a weight is first found in it (``mapping_of``): not for every library the process maps."""

    start: int
    stop: int
    path: str
    identity: FileIdentity | None = None

    def check_unchanged(self) -> None:
        """Raise ``SourceFileChangedError`` if the mapped file itself was modified since (the kernel then
        shows the new bytes, and drops even copied pages when it is truncated); a file replaced or
        deleted under its name keeps the mapped one intact."""
        try:
            now = _mapped_identity(self.start, self.stop, self.path)
        except OSError:
            return  # the mapping is gone from view: nothing in it can have changed for us
        modified = (now.size, now.mtime_ns) != (self.identity.size, self.identity.mtime_ns)
        if modified and now.inode == self.identity.inode:
            raise SourceFileChangedError(
                f"{self.path}: the file the model's weights are mapped from was modified on disk since they were "
                "loaded, so it no longer holds their originals; the model was left as it is: reload it"
            )


def mapped_files() -> list[MappedFile]:
    """The regular files mapped into this process, from ``/proc/self/maps`` (Linux; elsewhere none,
    and weights are then taken for ordinary memory)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/") or parts[5].startswith(("/dev/", "/memfd:")):
            continue
        path = parts[5].removesuffix(" (deleted)")
        start, stop = (int(x, 16) for x in parts[0].split("-"))
        found.append(MappedFile(start, stop, path))
    return sorted(found, key=lambda mapped: mapped.start)


def mapping_of(tensor: Tensor, mappings: list[MappedFile]) -> MappedFile | None:
    """The mapped file ``tensor``'s bytes lie in, if any (CPU tensors only). ``mappings`` is in
    address order, as ``/proc/self/maps`` lists them: a binary search."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    start = tensor.data_ptr()
    stop = start + tensor.numel() * tensor.element_size()
    index = bisect.bisect_right(mappings, start, key=lambda mapped: mapped.start) - 1
    if index < 0 or not (mappings[index].start <= start and stop <= mappings[index].stop):
        return None
    mapped = mappings[index]
    if mapped.identity is None:
        try:
            mapped.identity = _mapped_identity(mapped.start, mapped.stop, mapped.path)
        except OSError:  # not a file we can check later: treat the weight as ordinary memory
            return None
    return mapped


def _mapped_identity(start: int, stop: int, path: str) -> FileIdentity:
    """The mapped inode's identity: through ``/proc/self/map_files`` (the very file mapped, even if
    renamed over or deleted), else by its path."""
    try:
        return FileIdentity.of(f"/proc/self/map_files/{start:x}-{stop:x}")
    except OSError:
        return FileIdentity.of(path)
