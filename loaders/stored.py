"""A safetensors file read from its header, without torch: for describing a file fast.

``python -m lohakr info`` and other inspection need every module's algorithm, shapes, rank, alpha
and whether its values are finite, not tensors: importing torch alone takes longer than the whole
description. ``read_header`` checks the header as strictly as the safetensors library does (known
dtypes, shapes that match their bytes, offsets that tile the data exactly) and gives one
``StoredTensor`` per key; values are read through a memory map only where needed (alpha and stored
scalars, the finiteness check), with numpy. A full ``load_adapter`` reads the same checked header
and views each tensor in one private mapping of the file (no per-tensor reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import AdapterFormatError
from .safe_json import parse_json

# dtype → (bytes per element, floating point)
DTYPES: dict[str, tuple[int, bool]] = {
    "BOOL": (1, False), "U8": (1, False), "I8": (1, False), "U16": (2, False), "I16": (2, False),
    "U32": (4, False), "I32": (4, False), "U64": (8, False), "I64": (8, False),
    "F16": (2, True), "BF16": (2, True), "F32": (4, True), "F64": (8, True),
    "F8_E4M3": (1, True), "F8_E5M2": (1, True),
}
_NUMPY = {"BOOL": "bool", "U8": "u1", "I8": "i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
          "U64": "<u8", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8"}
# dtype → the torch dtype's attribute name (``torch_dtype``), for readers that build tensors
TORCH_DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
                     "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
                     "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
                     "F8_E5M2": "float8_e5m2"}
# Bit patterns of NaN/inf where numpy has no such dtype: (mask, value) on the raw unsigned integers.
_NONFINITE_BITS = {"BF16": ("<u2", 0x7F80, 0x7F80), "F8_E4M3": ("u1", 0x7F, 0x7F), "F8_E5M2": ("u1", 0x7C, 0x7C)}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """One tensor of a file, known from the header: dtype, shape and where its bytes lie. It answers
    what a module's validation asks (``shape``, ``dim()``, ``numel()``, ``is_floating_point()``);
    ``first_value`` and ``nonfinite_count`` read its bytes."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets of its bytes
    stop: int

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return DTYPES[self.dtype][0]

    def is_floating_point(self) -> bool:
        return DTYPES[self.dtype][1]

    def _raw(self, numpy_dtype: str):
        import numpy as np

        count = self.numel()
        if count == 0:
            return np.zeros(0, dtype=numpy_dtype)
        return np.memmap(self.path, dtype=numpy_dtype, mode="r", offset=self.start, shape=(count,))

    def first_value(self) -> float:
        """The first element as a float (alpha, a stored scalar)."""
        import numpy as np

        if self.dtype == "BF16":
            bits = np.array(self._raw("<u2")[:1], dtype=np.uint32) << 16
            return float(bits.view(np.float32)[0])
        if self.dtype in _NUMPY:
            return float(self._raw(_NUMPY[self.dtype])[0])
        raise AdapterFormatError(f"{self.path}: a value stored as {self.dtype} cannot be read as a number here")

    def nonfinite_count(self) -> int:
        """How many elements are NaN or inf (0 for integer dtypes)."""
        import numpy as np

        if not self.is_floating_point() or self.numel() == 0:
            return 0
        if self.dtype in _NONFINITE_BITS:
            numpy_dtype, mask, value = _NONFINITE_BITS[self.dtype]
            return int(np.count_nonzero((self._raw(numpy_dtype) & mask) == value))
        return int(np.count_nonzero(~np.isfinite(self._raw(_NUMPY[self.dtype]))))


def torch_dtype(name: str):
    """The torch dtype of safetensors dtype ``name`` (imports torch), or None where this torch lacks it."""
    import torch

    return getattr(torch, TORCH_DTYPE_NAMES.get(name, ""), None)


def _naturals(values: list) -> bool:
    """Every value a non-negative JSON integer (``true`` is no size, though Python's bool is an int)."""
    return all(type(value) is int and value >= 0 for value in values)


def read_header(path: str, header_length: int, size: int) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor of the file at ``path`` (``size`` bytes, header of ``header_length`` bytes after
    its 8-byte length) and the header metadata. Refuses what the safetensors library refuses, in
    an ``AdapterFormatError`` naming the file."""
    def broken(why: str) -> AdapterFormatError:
        return AdapterFormatError(f"{path}: not a readable safetensors file ({why}). The file may be truncated or "
                                  "corrupt; re-download it")

    if header_length > MAX_HEADER_BYTES:
        raise broken(f"a header of {header_length} bytes")
    with open(path, "rb") as handle:
        handle.seek(8)
        text = handle.read(header_length)
    header = parse_json(text, path, "the safetensors header")
    if not isinstance(header, dict):
        raise broken("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise broken("its metadata is not a map of strings")
    data_start, data_length = 8 + header_length, size - 8 - header_length
    tensors: dict[str, StoredTensor] = {}
    spans = []
    for key, entry in header.items():
        dtype = entry.get("dtype") if type(entry) is dict else None
        if dtype not in DTYPES:
            raise broken(f"tensor {key!r} has an unknown dtype {dtype!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if type(shape) is not list or type(offsets) is not list or len(offsets) != 2 or not (
                _naturals(shape) and _naturals(offsets)):
            raise broken(f"tensor {key!r} has an invalid shape or offsets")
        start, stop = offsets
        if stop < start or stop > data_length or (stop - start) != math.prod(shape) * DTYPES[dtype][0]:
            raise broken(f"tensor {key!r}: its shape, dtype and offsets disagree")
        tensors[key] = StoredTensor(path, dtype, tuple(shape), data_start + start, data_start + stop)
        spans.append((start, stop))
    position = 0
    for start, stop in sorted(spans):
        if start != position:
            raise broken("the tensors' offsets overlap or leave gaps")
        position = stop
    if position != data_length:
        raise broken("the data is not fully covered by the tensors")
    return tensors, metadata
