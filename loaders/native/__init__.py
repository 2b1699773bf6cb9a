"""Optional native CPU kernels: patch a weight in one pass, bit for bit.

PyTorch has no CPU kernel that multiply-adds a float32 update into a half weight in one pass: the
exact path widens each row block to float32, multiply-adds and narrows it back, three passes over
the weight's bytes where a copy makes one.
``kernels.c`` does the same float32 math in one pass. For LoHa it goes further: the two
branch GEMMs, their Hadamard product and the update run in one kernel, the branches summed in
registers in the order this machine's ``torch.bmm`` sums them, never stored (no buffer written and
read back, as a GEMM and a second pass need; float32 weights too). It is compiled on first use with the
system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into a per-user cache and called through
ctypes. A large weight is split across ``torch.get_num_threads()`` OpenMP threads of the runtime
PyTorch itself loaded (same soname), so no second thread pool spins against PyTorch's.

Safety: before a dtype is patched natively, the kernels' results are compared bit for bit with
PyTorch's own path on this machine (vector bodies and tails, every kernel; the fused LoHa kernel
per (dtype, rank) before that rank's first use, its float32 sums against ``torch.bmm``'s); any
difference and the PyTorch path is used for that dtype (or that rank). No compiler, another CPU
(not x86-64 with AVX2), a failed build or ``LOHAKR_NATIVE=0``: the PyTorch path, same bits,
slower. ``status()`` says which and why. Why each rank is checked: docs/architecture.md#native-kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger("lohakr")

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ["-O2", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared"]
# Half and bfloat16: a float32 weight is already patched in one pass by PyTorch's own multiply-add
# (and its broadcast rounding differs from one fma in some layouts). The fused LoHa kernel also
# takes float32 (code 0), where it saves the GEMMs' buffer (``loha_usable``).
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}
# Below this many elements a weight is patched on one thread: waking a team costs more.
PARALLEL_MIN_ELEMENTS = 1 << 18

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    configured = os.environ.get("LOHAKR_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lohakr"


def _compiler() -> str | None:
    configured = os.environ.get("CC")
    if configured:
        return shutil.which(configured)
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def _unsupported_reason() -> str | None:
    if os.environ.get("LOHAKR_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "off by LOHAKR_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no kernels for {platform.machine()} (x86-64 only)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"this CPU lacks AVX2/FMA (PyTorch capability {capability})"
    if not sys.platform.startswith("linux"):
        return f"built on Linux only (this is {sys.platform})"
    return None


def _wide_wanted() -> bool:
    """Whether the row kernels may use 16-lane AVX-512: where PyTorch's own CPU kernels do (its
    capability; ``ATEN_CPU_CAPABILITY=avx2`` turns both down), and the library then checks the CPU."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def use_vector_bits(bits: int) -> int:
    """Run the LoKr and LoHa row kernels on 512-bit (AVX-512, where this CPU has it) or 256-bit
    vectors, and check their bits against PyTorch again before the next use. Returns the width
    now used (0: no kernels here). For tests and benchmarks that compare the two; the width is
    otherwise chosen once, at load."""
    library = _load()
    if library is None:
        return 0
    with _lock:
        _state.pop("checked", None)
        _state["vector_bits"] = library.lohakr_vector_bits(bits)
        return _state["vector_bits"]  # type: ignore[return-value]


def vector_bits() -> int:
    """The vector width the row kernels use (512 or 256; 0 where there are no kernels)."""
    return _state.get("vector_bits", 0) if _load() is not None else 0  # type: ignore[return-value]


def _build(compiler: str) -> Path:
    """The compiled library, from the cache if this source was built with this compiler before."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join([compiler, *FLAGS, platform.machine()]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    library = folder / f"lohakr_native_{key}.so"
    if library.exists():
        return library
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: a per-user folder in the temp dir instead
        folder = Path(tempfile.gettempdir()) / f"lohakr-{os.getuid()}"
        library = folder / library.name
        if library.exists():
            return library
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        built = Path(scratch) / library.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(done.stderr or done.stdout).strip()[-400:]}")
        os.replace(built, library)  # atomic: a concurrent process sees the old or the new file
    return library


def _load() -> ctypes.CDLL | None:
    """Build and load the library once per process; ``None`` (with the reason in ``status()``) if
    it cannot be used here."""
    with _lock:
        if "library" in _state:
            return _state["library"]  # type: ignore[return-value]
        library, failed = None, False
        reason = _unsupported_reason()
        compiler = None if reason else _compiler()
        if reason is None and compiler is None:
            reason = "no C compiler found (set CC to one)"
        if reason is None:
            try:
                library = _bind(ctypes.CDLL(str(_build(compiler))))
                _state["vector_bits"] = bits = library.lohakr_vector_bits(512 if _wide_wanted() else 256)
                reason = f"compiled with {compiler}, {'AVX-512' if bits == 512 else 'AVX2'} rows"
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                reason, failed = f"build failed ({err})", True
        fallback = "half/bfloat16 CPU weights are patched through PyTorch's kernels: same bits, slower"
        if library is not None:
            logger.info("lohakr: native CPU kernels on (%s)", reason)
        elif failed:  # a compiler that fails is worth a warning; no compiler at all is expected
            logger.warning("lohakr: native CPU kernels unavailable, %s; %s", reason, fallback)
        else:
            logger.info("lohakr: native CPU kernels off (%s); %s", reason, fallback)
        _state["library"], _state["reason"] = library, reason
        return library


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, code, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    library.lohakr_kron_add.argtypes = [pointer, pointer, code, pointer, pointer, size, size, size, size, code]
    library.lohakr_kron_add.restype = None
    library.lohakr_hadamard_add.argtypes = [pointer, pointer, code, pointer, pointer, ctypes.c_float, size, code]
    library.lohakr_hadamard_add.restype = None
    library.lohakr_loha_add.argtypes = [pointer, pointer, code, pointer, pointer, size, size, pointer, pointer,
                                        ctypes.c_float, size, size, size, pointer, code]
    library.lohakr_loha_add.restype = None
    library.lohakr_kron_add_from_file.argtypes = [pointer, code, pointer, pointer, size, size, size, size, code, size,
                                                  code, pointer, size, code]
    library.lohakr_kron_add_from_file.restype = code
    library.lohakr_file_blocks.argtypes = [code, size, pointer, size, pointer, size, code]
    library.lohakr_file_blocks.restype = code
    library.lohakr_vector_bits.argtypes = [code]
    library.lohakr_vector_bits.restype = code
    return library


def loaded() -> bool:
    """True when the kernels are built and loaded in this process (built on first call)."""
    return _load() is not None


def status() -> str:
    """One line for reports: whether the native kernels are used, and why not."""
    library = _load()
    if library is None:
        return f"native CPU kernels: off, {_state['reason']}"
    checked = _state.get("checked", {})
    refused = [f"{str(d).removeprefix('torch.')} ({why})" for d, why in checked.items() if why]  # type: ignore[union-attr]
    line = f"native CPU kernels: on, {_state['reason']}"
    line += f"; not used for {', '.join(refused)}" if refused else ""
    by_dtype: dict[str, tuple[list[int], list[str]]] = {}
    for (dtype, rank), why in sorted(_state.get("loha_ranks", {}).items(), key=lambda item: item[0][1]):  # type: ignore[union-attr]
        fused, refused = by_dtype.setdefault(str(dtype).removeprefix("torch."), ([], []))
        (refused.append(f"{rank} ({why})") if why else fused.append(rank))
    for name, (fused, refused) in by_dtype.items():
        line += f"; {name} LoHa GEMMs fused at rank {', '.join(map(str, fused)) or 'none'}"
        line += f", not at rank {'; '.join(refused)}" if refused else ""
    return line


def usable(*tensors: Tensor) -> bool:
    """True when ``tensors`` (the live weight and its source) can be patched natively: CPU,
    contiguous, one supported dtype, and that dtype's bits checked against PyTorch."""
    first = tensors[0]
    if first.dtype not in DTYPE_CODES or any(
            t.device.type != "cpu" or t.dtype != first.dtype or not t.is_contiguous() for t in tensors):
        return False
    if _load() is None:
        return False
    return _checked(first.dtype)


def loha_usable(*tensors: Tensor) -> bool:
    """``usable`` for the fused LoHa kernel, which also patches float32 weights: PyTorch builds a
    float32 LoHa update with a GEMM into a buffer and a multiply-add, two passes where this is one.
    (Whether a layer's size and rank admit the kernel is ``loha_fused``.)"""
    first = tensors[0]
    if first.dtype != torch.float32:
        return usable(*tensors)
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors) and (
        _load() is not None)


def _checked(dtype: torch.dtype) -> bool:
    checked = _state.setdefault("checked", {})
    if dtype not in checked:  # type: ignore[operator]
        problem = _self_check(dtype)
        checked[dtype] = problem  # type: ignore[index]
        if problem:
            logger.warning("lohakr: native kernels differ from PyTorch for %s (%s); using PyTorch's path",
                           dtype, problem)
    return not checked[dtype]  # type: ignore[index]


def _self_check(dtype: torch.dtype) -> str:
    """Empty if both kernels give PyTorch's float32-path bits for ``dtype``, else what differed.
    Random values in runs with and without vector tails, of 8 lanes and of 16 (1 to 64 elements)."""
    g = torch.Generator().manual_seed(1234)
    value = 0.7310585786300049
    for run in (1, 7, 8, 15, 16, 17, 25, 37, 64):
        a, b, c = 3, 5, 4
        w1 = torch.randn(a, c, generator=g) * 0.1
        w2 = torch.randn(b, run, generator=g) * 0.05
        weight = (torch.randn(a * b, c * run, generator=g) * 0.02).to(dtype)
        work = weight.float()
        work.view(a, b, c, run).addcmul_(w1.view(a, 1, c, 1), w2.view(1, b, 1, run), value=value)
        out = torch.empty_like(weight)
        kron_add(out, weight, w1 * value, w2)
        if not torch.equal(out, work.to(dtype)):
            return f"LoKr kernel, rows of {run}"
        p = torch.randn(a * b, c * run, generator=g)
        q = torch.randn(a * b, c * run, generator=g) * 0.01
        work = weight.float().addcmul_(p, q, value=value)
        hadamard_add(out, weight, p, q, value)
        if not torch.equal(out, work.to(dtype)):
            return f"LoHa kernel, rows of {run}"
    return ""


# Where the fused LoHa kernel may be used: each (dtype, rank) is checked against torch.bmm before
# its first use (``loha_fused_rank_ok``), and a weight must have at least this many rows and
# columns. Below that this machine's torch.bmm (MKL) switches to kernels that order their sums
# differently (seen at widths 1-8 and 1-2 rows), and such layers are too small to matter.
FUSED_MIN_ROWS, FUSED_MIN_WIDTH = 16, 64


def loha_fused(dtype: torch.dtype, rows: int, width: int, rank: int) -> bool:
    """True when ``loha_add`` may patch this LoHa layer (weight ``(rows, width)``, GEMM inner size
    ``rank``) with the bits of ``torch.bmm`` followed by PyTorch's multiply-add. Call after
    ``loha_usable``."""
    return rows >= FUSED_MIN_ROWS and width >= FUSED_MIN_WIDTH and rank >= 1 and loha_fused_rank_ok(dtype, rank)


def loha_fused_rank_ok(dtype: torch.dtype, rank: int) -> bool:
    """Whether the fused GEMM + update gives, for ``dtype`` at exactly this ``rank``, PyTorch's bits
    on this machine. Checked once per (dtype, rank) per process, before the rank's first use (about
    a millisecond each; see docs/architecture.md#native-kernels): plain and Tucker (transposed)
    output factors, row and column tails, rows wider than one packed panel."""
    checked = _state.setdefault("loha_ranks", {})
    key = (dtype, rank)
    if key not in checked:  # type: ignore[operator]
        problem = _fused_check(dtype, rank)
        if problem:
            logger.info("lohakr: fused LoHa kernel not used for %s at rank %d (%s); the GEMM path patches it",
                        dtype, rank, problem)
        checked[key] = problem  # type: ignore[index]
    return not checked[key]  # type: ignore[index]


def _fused_check(dtype: torch.dtype, rank: int) -> str:
    """Empty if ``loha_add`` at ``rank`` gives PyTorch's bits, else where it differed. First each
    branch's float32 sums alone (the other branch made exactly 1, the weight float32 zeros: a
    half/bfloat16 rounding could hide a last-bit difference), then the whole update in ``dtype``."""
    g = torch.Generator().manual_seed(4321 + rank)
    value = 0.3183098861837907
    cases = [(FUSED_MIN_ROWS, FUSED_MIN_WIDTH, False), (FUSED_MIN_ROWS + 1, FUSED_MIN_WIDTH + 3, True),
             (35, 200, False)]
    cases += [(96, 1300, False), (40, 1300, True)]  # rows wider than one packed panel
    for rows, width, tucker in cases:
        where = f"{rows}x{width}{', Tucker' if tucker else ''}"
        if tucker:  # a Tucker factor is stored (r, O): its transposed view
            outs = torch.randn(2, rank, rows, generator=g).transpose(1, 2)
        else:
            outs = torch.randn(2, rows, rank, generator=g)
        ins = torch.randn(2, rank, width, generator=g) * 0.1
        both = torch.bmm(outs, ins)
        for branch in (0, 1):
            other = 1 - branch
            unit_outs, unit_ins = outs.clone(), ins.clone()  # the other branch: exactly 1 everywhere
            unit_outs[other], unit_ins[other] = 0, 0
            unit_outs[other, :, 0], unit_ins[other, 0] = 1, 1
            zeros = torch.zeros(rows, width)
            sums = torch.empty_like(zeros)
            _loha_add(sums, zeros, unit_outs, unit_ins, 1.0, dtype_code=0)
            if not torch.equal(sums, both[branch]):
                return f"rank {rank}: sums differ from torch.bmm's at {where}"
        weight = (torch.randn(rows, width, generator=g) * 0.02).to(dtype)
        expected = weight.to(torch.float32, copy=True).addcmul_(both[0], both[1], value=value).to(dtype)
        out = torch.empty_like(weight)
        loha_add(out, weight, outs, ins, value)
        if not torch.equal(out.view(torch.uint8), expected.view(torch.uint8)):
            return f"rank {rank}: the update differs from torch.bmm + addcmul at {where}"
    return ""


def _threads(elements: int) -> int:
    """PyTorch's thread count for a large weight, one thread below ``PARALLEL_MIN_ELEMENTS``."""
    return 1 if elements < PARALLEL_MIN_ELEMENTS else max(1, torch.get_num_threads())


def _kron_operands(weight: Tensor, w1_scaled: Tensor, w2: Tensor,
                   fits: bool = True) -> tuple[Tensor, Tensor, tuple[int, int, int, int]]:
    """The factors as the kernels take them (contiguous float32) and ``(a, b, c, k)``; refuses
    factors whose Kronecker product is not ``weight``'s size (or ``fits`` False: a source of
    another shape)."""
    (a, c), (b, k) = w1_scaled.shape, w2.shape
    if not fits or weight.numel() != a * b * c * k:
        raise ValueError(f"Kronecker factors {tuple(w1_scaled.shape)} ⊗ {tuple(w2.shape)} do not fit "
                         f"{tuple(weight.shape)}")
    return w1_scaled.contiguous().float(), w2.contiguous().float(), (a, b, c, k)


def kron_add(out: Tensor, source: Tensor, w1_scaled: Tensor, w2: Tensor) -> None:
    """``out = source + w1_scaled ⊗ w2`` (the float32 math of ``rebuild.kron_add``), one pass.

    ``out``/``source``: the weight, contiguous, same dtype (may be the same tensor), ``a·b`` rows;
    ``w1_scaled``: ``value · w1``, float32 ``(a, c)``; ``w2``: float32 ``(b, k)``, ``c·k`` = the row
    width. Callers check ``usable`` first."""
    library = _load()
    w1_scaled, w2, (a, b, c, k) = _kron_operands(out, w1_scaled, w2, source.shape == out.shape)
    library.lohakr_kron_add(source.data_ptr(), out.data_ptr(), DTYPE_CODES[out.dtype], w1_scaled.data_ptr(),
                            w2.data_ptr(), a * b, b, c, k, _threads(out.numel()))


# Each thread of ``kron_add_from_file`` reads (and compares) and patches this many bytes at a time
# (at least a row): a block that stays in its core's L2 between the read and the patch.
FILE_BLOCK_BYTES = 256 << 10
_SHORT_FILE, _NOT_RESTORED = -100000, -200000
_file_buffers = threading.local()


class NotRestoredError(RuntimeError):
    """A checked patch found a difference or a failed read and could not put back rows it had
    already patched: the weight is partly patched."""


def kron_add_from_file(weight: Tensor, w1_scaled: Tensor, w2: Tensor, fd: int, offset: int, check: bool) -> bool:
    """``kron_add`` in place on ``weight`` (half/bfloat16, contiguous, on the CPU) from its original,
    file ``fd``'s bytes at ``offset``, read in the same pass, a block at a time, patched while in
    cache: one pass where reading (or comparing) first and patching after takes two.

    ``check`` (a first write over the original itself): each block is compared with the file just
    before it is patched. True: the weight equalled the file and is patched. False: it differs, and
    is left exactly as it was. Without ``check`` (over patched values) each block is first read back
    from the file into the weight; always True.
    Raises ``EOFError`` if the file is shorter than the weight (truncated since its header was
    read) and ``OSError`` for a failed read: with ``check`` the weight is as it was, unless
    ``NotRestoredError``. Callers check ``usable`` first."""
    library = _load()
    if weight.dtype not in DTYPE_CODES or not weight.is_contiguous():
        raise ValueError("kron_add_from_file: the weight must be half or bfloat16 and contiguous")
    w1_scaled, w2, (a, b, c, k) = _kron_operands(weight, w1_scaled, w2)
    threads = _threads(weight.numel())
    per_thread = max(FILE_BLOCK_BYTES, c * k * weight.element_size())
    status = library.lohakr_kron_add_from_file(weight.data_ptr(), DTYPE_CODES[weight.dtype], w1_scaled.data_ptr(),
                                               w2.data_ptr(), a * b, b, c, k, fd, offset, int(check),
                                               _file_buffer(threads * per_thread), per_thread, threads)
    _raise_for(status, offset + weight.numel() * weight.element_size())
    return status == 0


# A file range is split among threads from this size on (one thread's block below it).
FILE_SPLIT_BYTES = 1 << 20
FILE_READ_BLOCK_BYTES = 1 << 20


def file_equals(fd: int, offset: int, address: int, size: int) -> bool:
    """True when the ``size`` bytes at ``address`` equal file ``fd``'s at ``offset``: each thread
    reads its blocks into an L2-sized buffer and compares. Raises as ``kron_add_from_file``."""
    threads = 1 if size < FILE_SPLIT_BYTES else max(1, torch.get_num_threads())
    status = _load().lohakr_file_blocks(fd, offset, address, size, _file_buffer(threads * FILE_BLOCK_BYTES),
                                        FILE_BLOCK_BYTES, threads)
    _raise_for(status, offset + size)
    return status == 0


def file_read(fd: int, offset: int, address: int, size: int) -> None:
    """File ``fd``'s ``size`` bytes at ``offset`` into memory at ``address``, split among threads."""
    threads = 1 if size < FILE_SPLIT_BYTES else max(1, torch.get_num_threads())
    status = _load().lohakr_file_blocks(fd, offset, address, size, None, FILE_READ_BLOCK_BYTES, threads)
    _raise_for(status, offset + size)


def _file_buffer(size: int) -> int:
    """This thread's read buffer for the file kernels, at least ``size`` bytes (grown, then reused)."""
    buffer = getattr(_file_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _file_buffers.buffer = ctypes.create_string_buffer(size)  # zeroed: touched once
    return ctypes.addressof(buffer)


def _raise_for(status: int, end: int) -> None:
    """The file kernels' failures as exceptions (0 and 1 are results, not failures)."""
    if status >= 0:
        return
    if status == _NOT_RESTORED:
        raise NotRestoredError("a read of the source file failed while patched rows were being put back")
    if status == _SHORT_FILE:
        raise EOFError(f"the file ends before byte {end}")
    raise OSError(-status, os.strerror(-status))


def hadamard_add(out: Tensor, source: Tensor, p: Tensor, q: Tensor, value: float) -> None:
    """``out = source + value · p ⊙ q`` (the float32 math of ``addcmul``), one pass. ``out`` and
    ``source``: the same number of elements as ``p`` and ``q`` (float32, contiguous)."""
    library = _load()
    if not (out.numel() == source.numel() == p.numel() == q.numel()):
        raise ValueError("hadamard_add: sizes differ")
    if not (p.is_contiguous() and q.is_contiguous() and p.dtype == q.dtype == torch.float32):
        raise ValueError("hadamard_add: the branches must be contiguous float32")
    library.lohakr_hadamard_add(source.data_ptr(), out.data_ptr(), DTYPE_CODES[out.dtype], p.data_ptr(),
                                q.data_ptr(), value, out.numel(), _threads(out.numel()))


def packed_size(rank: int, width: int) -> int:
    """Float32 elements ``loha_add`` needs for its packed copy of the input factors."""
    return 2 * rank * -(-width // 16) * 16


def loha_add(out: Tensor, source: Tensor, outs: Tensor, ins: Tensor, value: float,
             packed: Tensor | None = None) -> None:
    """``out = source + value · (outs[0] @ ins[0]) ⊙ (outs[1] @ ins[1])`` in one pass, GEMMs included:
    the two branches are summed in registers (in ``torch.bmm``'s order here, which
    ``loha_fused_rank_limit`` checks) and never written to memory.

    ``out``/``source``: the weight viewed ``(rows, width)``, contiguous, same dtype (may be the same
    tensor); ``outs``: float32 ``(2, rows, rank)`` at any strides with a shared layout (a Tucker
    factor's transposed view is fine); ``ins``: float32 ``(2, rank, width)``; ``packed``: an optional
    reusable float32 buffer of at least ``packed_size(rank, width)`` elements."""
    _loha_add(out, source, outs, ins, value, packed, 0 if out.dtype == torch.float32 else DTYPE_CODES[out.dtype])


def _loha_add(out: Tensor, source: Tensor, outs: Tensor, ins: Tensor, value: float,
              packed: Tensor | None = None, dtype_code: int = 0) -> None:
    library = _load()
    rows, width = out.shape
    _, rank, ins_width = ins.shape
    if outs.shape != (2, rows, rank) or ins_width != width or source.shape != out.shape or rank < 1:
        raise ValueError(f"LoHa factors {tuple(outs.shape)} @ {tuple(ins.shape)} do not fit {tuple(out.shape)}")
    if outs.dtype != torch.float32 or ins.dtype != torch.float32 or outs[0].stride() != outs[1].stride():
        raise ValueError("loha_add: the factors must be float32, both branches in one layout")
    ins = ins.contiguous()
    need = packed_size(rank, width)
    if packed is None or packed.numel() < need or packed.dtype != torch.float32 or not packed.is_contiguous():
        packed = torch.empty(need, dtype=torch.float32)
    row_stride, rank_stride = outs.stride(1), outs.stride(2)
    # An element here costs 4·rank flops, about rank/8 elements' worth of a one-pass copy-add.
    library.lohakr_loha_add(source.data_ptr(), out.data_ptr(), dtype_code, outs[0].data_ptr(),
                            outs[1].data_ptr(), row_stride, rank_stride, ins[0].data_ptr(), ins[1].data_ptr(),
                            value, rows, width, rank, packed.data_ptr(), _threads(out.numel() * (1 + rank // 8)))
