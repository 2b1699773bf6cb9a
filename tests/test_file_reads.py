"""Reading originals straight from their file (docs/architecture.md#originals-in-files): ``pread``
compares and copies (``loaders/file_reads.py``), and the native LoKr pass that reads (or compares)
each block of the file and patches it while it is in cache (``native.kron_add_from_file``). A
weight that differs anywhere from its file is left exactly as it was, however far the pass got; a
file cut short is an error, not a silent partial read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_native import HALF_TYPES, kron_reference
from test_originals_in_files import load, same, saved_sdxl, snapshot

from lohakr import SourceFileChangedError
from lohakr.loaders import apply, file_reads, native
from lohakr.loaders.diffusers_pipeline import pipeline_layout


def written(tmp_path: Path, tensor: torch.Tensor, lead: int = 37) -> tuple[int, int]:
    """``tensor``'s bytes in a file after ``lead`` bytes of something else: an open descriptor and
    the offset (closed at the end of the test by the fixture's folder going away)."""
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(lead) + tensor.view(torch.uint8).reshape(-1).numpy().tobytes())
    return os.open(path, os.O_RDONLY), lead


@pytest.fixture(params=["native", "python"])
def reads(request, monkeypatch):
    """Both ways file_reads reads: the native kernels (on PyTorch's OpenMP threads) and its own
    thread pool; ranges split across two threads from a few KiB on, in small blocks."""
    if request.param == "native":
        request.getfixturevalue("native_on")
        monkeypatch.setattr(native, "FILE_SPLIT_BYTES", 4096)
        monkeypatch.setattr(native, "FILE_BLOCK_BYTES", 1000)
        monkeypatch.setattr(native, "FILE_READ_BLOCK_BYTES", 1000)
    else:
        monkeypatch.setattr(file_reads, "_native", lambda: None)
        monkeypatch.setattr(file_reads, "SPLIT_BYTES", 4096)
        monkeypatch.setattr(file_reads, "CHUNK_BYTES", 1000)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("size", [1, 999, 1000, 4096 * 3 + 5, 100_000])
def test_equals_and_read_into_find_every_byte(tmp_path, reads, size):
    original = torch.randint(0, 256, (size,), dtype=torch.uint8)
    fd, offset = written(tmp_path, original)
    try:
        assert file_reads.equals(fd, offset, original.clone())
        for where in {0, size // 2, size - 1}:
            changed = original.clone()
            changed[where] ^= 1
            assert not file_reads.equals(fd, offset, changed)
        target = torch.zeros(size, dtype=torch.uint8)
        file_reads.read_into(fd, offset, target)
        assert torch.equal(target, original)
        with pytest.raises(file_reads.ShortReadError):  # asks past the end of the file
            file_reads.read_into(fd, offset + 1, target)
        with pytest.raises(file_reads.ShortReadError):  # equal to the file's bytes up to its end
            file_reads.equals(fd, offset + 1, torch.cat([original[1:], original[:1]]))
    finally:
        os.close(fd)


def test_same_bytes_sees_nan_payloads_and_signed_zeros():
    a = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float16)
    b = a.clone()
    assert file_reads.same_bytes(a, b)
    b[0] = -0.0
    assert not file_reads.same_bytes(a, b)
    c = a.clone()
    c.view(torch.int16)[1] += 1  # another NaN payload
    assert not file_reads.same_bytes(a, c)
    assert not file_reads.same_bytes(a, a.float())


def kron_case(dtype: torch.dtype, a=4, b=16, c=3, k=40):
    g = torch.Generator().manual_seed(a + b + k)
    w1, w2 = torch.randn(a, c, generator=g) * 0.1, torch.randn(b, k, generator=g) * 0.05
    weight = (torch.randn(a * b, c * k, generator=g) * 0.02).to(dtype)
    return weight, w1, w2


@pytest.fixture
def small_blocks(native_on, monkeypatch):
    """Blocks of a few rows and two threads: a weight of many blocks, split between threads."""
    monkeypatch.setattr(native, "FILE_BLOCK_BYTES", 512)
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_checked_pass_patches_a_weight_equal_to_its_file(tmp_path, vector_bits, small_blocks, dtype):
    weight, w1, w2 = kron_case(dtype)
    expected = kron_reference(weight, w1, w2, 0.7)
    fd, offset = written(tmp_path, weight)
    try:
        live = weight.clone()
        assert native.kron_add_from_file(live, w1 * 0.7, w2, fd, offset, check=True)
        assert torch.equal(live, expected)
        # over patched values: each block read back from the file first, then patched
        assert native.kron_add_from_file(live, w1 * 0.7, w2, fd, offset, check=False)
        assert torch.equal(live, expected)
    finally:
        os.close(fd)


@pytest.mark.parametrize("row", [0, 17, 33, 63])  # first block, either thread's middle, the last row
def test_a_weight_that_differs_anywhere_is_left_exactly_as_it_was(tmp_path, small_blocks, row):
    weight, w1, w2 = kron_case(torch.float16)
    fd, offset = written(tmp_path, weight)
    try:
        live = weight.clone()
        live[row, -1] += 1  # one element, edited since loading
        edited = live.clone()
        assert not native.kron_add_from_file(live, w1 * 0.7, w2, fd, offset, check=True)
        assert torch.equal(live.view(torch.int16), edited.view(torch.int16))  # rows patched before were put back
    finally:
        os.close(fd)


def test_a_file_cut_short_is_an_error_and_the_weight_is_kept(tmp_path, small_blocks):
    weight, w1, w2 = kron_case(torch.bfloat16)
    fd, offset = written(tmp_path, weight)
    os.truncate(tmp_path / "weights.bin", offset + weight.numel())  # half the weight's bytes
    try:
        live = weight.clone()
        with pytest.raises(EOFError, match="ends before"):
            native.kron_add_from_file(live, w1 * 0.7, w2, fd, offset, check=True)
        assert torch.equal(live, weight)
    finally:
        os.close(fd)


def test_only_a_lone_lokr_on_a_half_cpu_weight_takes_the_file_pass(native_on, lycoris_file):
    from lohakr import load_adapter

    lokr = next(iter(load_adapter(lycoris_file("sdxl", "lokr_f4").path).modules.values()))
    loha = next(iter(load_adapter(lycoris_file("sdxl", "loha").path).modules.values()))
    half = torch.zeros(lokr.weight_shape, dtype=torch.float16)
    # nothing is read: the descriptor is never used when no kernel takes the contributions
    assert apply.patch_from_file(half.float(), (-1, 0), [(lokr, 1.0)], True) is None
    assert apply.patch_from_file(half, (-1, 0), [(lokr, 1.0), (lokr, 0.5)], True) is None
    assert apply.patch_from_file(torch.zeros(loha.weight_shape, dtype=torch.float16), (-1, 0), [(loha, 1.0)],
                                 True) is None
    assert apply.patch_from_file(half, (-1, 0), [(lokr, 0.0)], True) is None


def test_an_edit_in_a_late_row_of_a_lokr_layer_is_found_and_kept(lycoris_file, tmp_path, native_on, monkeypatch):
    """Copied into memory, one element of the last row of a layer edited: the one-pass LoKr load
    compares and patches the rows before it, finds the edit, puts those rows back from the file and
    keeps the weight in memory as its original; the unload gives the edited weight back."""
    monkeypatch.setattr(native, "FILE_BLOCK_BYTES", 256)
    pipe = load(saved_sdxl(tmp_path), memory="copied")
    adapter = lycoris_file("sdxl", "lokr_f4").path
    keys = {o.target for o in pipe.load_lokr(adapter, "probe").applied}
    pipe.unload_lycoris("probe")
    edited = next(t for t in pipeline_layout(pipe).targets.values() if t.key in keys and t.component == "unet"
                  and t.layer.weight.shape[0] >= 8)
    with torch.no_grad():
        edited.layer.weight.view(edited.layer.weight.shape[0], -1)[-1, -1] += 1
    before = snapshot(pipe)
    report = pipe.load_lokr(adapter, "a", strength=0.6)
    assert report.originals["ram"]["layers"] == 1
    assert any(edited.key in w and "kept in memory" in w for w in report.warnings)
    in_memory = load(saved_sdxl(tmp_path / "again"), memory="copied", keep_originals_on="cpu")
    with torch.no_grad():
        target = pipeline_layout(in_memory).targets[edited.key]
        target.layer.weight.view(target.layer.weight.shape[0], -1)[-1, -1] += 1
    in_memory.load_lokr(adapter, "a", strength=0.6)
    assert same(snapshot(pipe), snapshot(in_memory))
    pipe.unload_lycoris("a")
    assert same(before, snapshot(pipe))


@pytest.mark.parametrize("when", ["before the first read", "after the file was opened"])
def test_a_file_cut_short_after_its_header_was_read_is_a_changed_file(tmp_path, when):
    from safetensors.torch import save_file

    from lohakr.loaders.sources import SafetensorsFile

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(64, 64).half(), "b": torch.randn(300, 64).half()}, str(path))
    file = SafetensorsFile(path)
    live = torch.empty(300, 64, dtype=torch.float16)
    if when == "after the file was opened":
        file.read_into("a", torch.empty(64, 64, dtype=torch.float16))
    stat = path.stat()
    os.truncate(path, stat.st_size - 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same mtime: only the size says it
    before = live.clone()
    with pytest.raises(SourceFileChangedError, match=path.name):
        file.read_into("b", live)
    with pytest.raises(SourceFileChangedError, match=path.name):
        file.equals("b", live)
    if when == "before the first read":
        assert torch.equal(live.view(torch.int16), before.view(torch.int16))


def test_a_lone_lokr_loads_and_reweights_in_the_file_pass_with_the_in_memory_bits(lycoris_file, tmp_path, native_on,
                                                                                   monkeypatch):
    """Copied into memory: the first load checks each weight against its file in the patch's pass,
    each strength change reads the original back in it; every step gives the bits of originals
    kept in memory, and the unload gives the model back bit for bit."""
    calls: list[bool] = []
    kernel = native.kron_add_from_file
    monkeypatch.setattr(native, "kron_add_from_file", lambda *args: calls.append(args[-1]) or kernel(*args))
    folder = saved_sdxl(tmp_path)
    in_file, in_memory = load(folder, memory="copied"), load(folder, memory="copied", keep_originals_on="cpu")
    before = snapshot(in_file)
    adapter = lycoris_file("sdxl", "lokr_f4").path
    for strength in (None, 0.3, -0.8):
        for pipe in (in_file, in_memory):
            if strength is None:
                report = pipe.load_lokr(adapter, "a", strength=0.6)
            else:
                pipe.set_lycoris_strength("a", strength)
        assert same(snapshot(in_file), snapshot(in_memory))
    layers = len(report.applied)
    assert calls == [True] * layers + [False] * layers * 2
    in_file.unload_lycoris("a")
    assert same(before, snapshot(in_file))
