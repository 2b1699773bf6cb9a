"""A file's bytes read straight from the page cache into memory we already own: ``pread`` into a
weight (restoring an original) or into a small reused buffer compared with a weight (verifying one
before it is patched in place); docs/architecture.md#originals-in-files.

Why not the memory map the rest of ``sources`` uses: mapping a cached file costs one page-table
entry per 4 KiB page. For the 6 GiB of a full SDXL that is about 0.4 s on its own, before a byte
is compared or copied; ``pread`` copies from the page cache without mapping anything, and the
compare then reads a buffer that stays in the L2 cache (benchmarks/README.md#first-load). A large
range is split across PyTorch's threads, by the native kernels where they are built (PyTorch's
OpenMP team), else by a thread pool here (ctypes calls release the GIL): one core does not fill the
memory bus.

Without a C library to call (not Linux or macOS), ``available()`` is False and callers use the
memory map instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
from torch import Tensor

CHUNK_BYTES = 2 << 20  # one compare step: a pread into an L2-sized buffer, then a memcmp
SPLIT_BYTES = 8 << 20  # a range below this stays on the calling thread: waking another costs more
PREAD_MAX = 0x7FFFF000  # Linux reads at most this much per call


def _load_libc() -> ctypes.CDLL | None:
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.memcmp.restype = ctypes.c_int
        libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        libc.pread.restype = ctypes.c_ssize_t
        libc.pread.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64)
    except (OSError, AttributeError):
        return None
    return libc


_libc = _load_libc()
_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


class ShortReadError(OSError):
    """The file ended before the range asked for: it was truncated after its header was read."""


def available() -> bool:
    return _libc is not None


def read_into(fd: int, offset: int, out: Tensor) -> None:
    """Fill contiguous CPU tensor ``out`` with the file's bytes at ``offset`` (its ``nbytes`` of them)."""
    address, size = _cpu_range(out)
    kernels = _native()
    if kernels is not None:
        with _short_read():
            kernels.file_read(fd, offset, address, size)
        return

    def read(start: int, length: int) -> bool:
        _pread_exactly(fd, address + start, length, offset + start)
        return True

    _split(size, read)


def equals(fd: int, offset: int, live: Tensor) -> bool:
    """True when contiguous CPU tensor ``live`` holds exactly the file's bytes at ``offset``, bit for
    bit (NaN payloads and signed zeros included). Stops early at the first difference."""
    address, size = _cpu_range(live)
    kernels = _native()
    if kernels is not None:
        with _short_read():
            return kernels.file_equals(fd, offset, address, size)
    differs = threading.Event()

    def compare(start: int, length: int) -> bool:
        buffer = _buffer()
        end = start + length
        while start < end and not differs.is_set():
            step = min(CHUNK_BYTES, end - start)
            _pread_exactly(fd, buffer, step, offset + start)
            if _libc.memcmp(address + start, buffer, step) != 0:
                differs.set()
                return False
            start += step
        return not differs.is_set()

    return _split(size, compare) and not differs.is_set()


def same_bytes(live: Tensor, stored: Tensor) -> bool:
    """True when ``live`` holds exactly ``stored``'s bytes (dtype, element count, every bit), compared
    on ``live``'s device: for tensors not both contiguous on the CPU, or without ``pread``."""
    if live.dtype != stored.dtype or live.numel() != stored.numel():
        return False
    if _libc is not None and live.device.type == stored.device.type == "cpu" and live.is_contiguous() and (
            stored.is_contiguous()):
        return _libc.memcmp(live.data_ptr(), stored.data_ptr(), live.numel() * live.element_size()) == 0
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[live.element_size()]
    return bool(torch.equal(live.reshape(-1).view(as_int), stored.reshape(-1).view(as_int).to(live.device)))


def _native():
    """The native kernels' file reads where they are built: on PyTorch's own OpenMP threads, which
    do not spin against this module's threads between one layer's patch and the next compare."""
    from . import native

    return native if native.loaded() else None


@contextlib.contextmanager
def _short_read():
    try:
        yield
    except EOFError as err:
        raise ShortReadError(str(err)) from err


def _cpu_range(tensor: Tensor) -> tuple[int, int]:
    if _libc is None:
        raise RuntimeError("no C library to read files with: use the memory map")
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("file reads go into contiguous CPU tensors only")
    return tensor.data_ptr(), tensor.numel() * tensor.element_size()


def _pread_exactly(fd: int, address: int, length: int, offset: int) -> None:
    while length > 0:
        done = _libc.pread(fd, address, min(length, PREAD_MAX), offset)
        if done < 0:
            errno = ctypes.get_errno()
            if errno == 4:  # EINTR: a signal arrived before anything was read
                continue
            raise OSError(errno, os.strerror(errno))
        if done == 0:
            raise ShortReadError(f"the file ends before byte {offset + length}")
        address, length, offset = address + done, length - done, offset + done


def _buffer() -> int:
    """This thread's compare buffer (allocated and touched once, then reused)."""
    buffer = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < CHUNK_BYTES:
        buffer = _local.buffer = ctypes.create_string_buffer(CHUNK_BYTES)  # zeroed: touched once
    return ctypes.addressof(buffer)


def _split(size: int, work) -> bool:
    """``work(start, length)`` over ``[0, size)``: on this thread alone for a small range, else in
    one part per thread (the first on this one); True when every part returned True."""
    parts = max(1, min(torch.get_num_threads(), size // SPLIT_BYTES))
    if parts == 1:
        return work(0, size)
    step = -(-size // parts)
    step += -step % 4096  # page-aligned parts
    pending = [_threads(parts - 1).submit(work, start, min(step, size - start)) for start in range(step, size, step)]
    try:
        here = work(0, step)
    finally:
        wait(pending)  # never return (or raise) while a worker still reads into the caller's memory
    return here and all([future.result() for future in pending])


def _threads(count: int) -> ThreadPoolExecutor:
    """Worker threads for all but the calling thread's part, kept for reuse."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            _pool, _pool_size = ThreadPoolExecutor(max_workers=count, thread_name_prefix="lohakr-read"), count
        return _pool
