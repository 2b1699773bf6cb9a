"""The optional native CPU kernels (``loaders/native.py``): the same bits as PyTorch's float32 path
in every layout and dtype they take, used only after that is checked, and a clear fallback with the
reason when they cannot be built or used."""

from __future__ import annotations

import pytest
import torch

import lohakr
from lohakr import load_adapter
from lohakr.loaders import native, rebuild
from lohakr.loaders.modules import LohaModule
from lohakr.loaders.patcher import _write_weight
from test_diffusers import layer_weights, make_pipe

HALF_TYPES = [torch.float16, torch.bfloat16]


def kron_reference(weight, w1, w2, value):
    """PyTorch's float32 path: widen, one multiply-add per element, narrow once."""
    (a, c), (b, k) = w1.shape, w2.shape
    work = weight.float()
    work.view(a, b, c, k).addcmul_(w1.view(a, 1, c, 1), w2.view(1, b, 1, k), value=value)
    return work.to(weight.dtype)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("a, b, c, k", [(1, 1, 1, 1), (3, 5, 4, 7), (2, 8, 3, 16), (4, 6, 2, 37),
                                        (2, 40, 8, 300), (8, 3, 1, 9)])
@pytest.mark.parametrize("value", [1.0, 0.3711, -2.5])
@pytest.mark.parametrize("threads", [1, 2])
def test_kron_kernel_equals_pytorch_bit_for_bit(native_on, monkeypatch, dtype, a, b, c, k, value, threads):
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 0)  # split even small weights across threads
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(a * 1000 + k)
        w1, w2 = torch.randn(a, c, generator=g) * 0.1, torch.randn(b, k, generator=g) * 0.05
        weight = (torch.randn(a * b, c * k, generator=g) * 0.02).to(dtype)
        out = torch.empty_like(weight)
        native.kron_add(out, weight, w1 * value, w2)
        assert torch.equal(out, kron_reference(weight, w1, w2, value))
        in_place = weight.clone()
        native.kron_add(in_place, in_place, w1 * value, w2)
        assert torch.equal(in_place, out)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("size", [1, 7, 8, 9, 63, 64, 1000, 70001])
def test_hadamard_kernel_equals_pytorch_bit_for_bit(native_on, monkeypatch, dtype, size):
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(size)
    weight = (torch.randn(size, generator=g) * 0.02).to(dtype)
    p, q = torch.randn(size, generator=g), torch.randn(size, generator=g) * 0.01
    out = torch.empty_like(weight)
    native.hadamard_add(out, weight, p, q, 0.6180339887)
    assert torch.equal(out, weight.float().addcmul_(p, q, value=0.6180339887).to(dtype))


def test_special_values_round_as_pytorch_does(native_on):
    """Overflow to ±inf, subnormal results and signed zeros come out as PyTorch's casts give them."""
    for dtype in HALF_TYPES:
        big = torch.finfo(dtype).max
        tiny = torch.finfo(dtype).tiny
        weight = torch.tensor([big, -big, tiny, -tiny, 0.0, -0.0, 1.0, 3 * tiny / 8], dtype=dtype)
        p = torch.tensor([big, big, -tiny / 4, tiny / 4, 0.0, -0.0, 1e-4, 1e-9])
        q = torch.ones(8)
        out = torch.empty_like(weight)
        native.hadamard_add(out, weight, p, q, 1.0)
        expected = weight.float().addcmul_(p, q).to(dtype)
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16)), dtype


def test_the_check_before_use_passes_here(native_on):
    """On this PyTorch the kernels pass their own bit check for both dtypes, so they are used."""
    for dtype in HALF_TYPES:
        assert native.usable(torch.empty(1, dtype=dtype)), native.status()
    assert native.status().startswith("native CPU kernels: on, compiled with ")
    assert "not used" not in native.status()


def test_shapes_that_do_not_fit_are_refused(native_on):
    weight = torch.zeros(6, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not fit"):
        native.kron_add(weight, weight, torch.ones(2, 2), torch.ones(3, 5))
    with pytest.raises(ValueError, match="sizes differ"):
        native.hadamard_add(weight, weight, torch.ones(48), torch.ones(47), 1.0)


def loha_module(tucker: bool, dtype=torch.float16):
    g = torch.Generator().manual_seed(7)
    r, out_dim, in_dim = 4, 24, 10
    if tucker:
        tensors = {"hada_w1_a": torch.randn(r, out_dim, generator=g), "hada_w1_b": torch.randn(r, in_dim, generator=g),
                   "hada_w2_a": torch.randn(r, out_dim, generator=g), "hada_w2_b": torch.randn(r, in_dim, generator=g),
                   "hada_t1": torch.randn(r, r, 3, 3, generator=g), "hada_t2": torch.randn(r, r, 3, 3, generator=g)}
    else:
        tensors = {"hada_w1_a": torch.randn(out_dim, r, generator=g), "hada_w1_b": torch.randn(r, in_dim * 9, generator=g),
                   "hada_w2_a": torch.randn(out_dim, r, generator=g), "hada_w2_b": torch.randn(r, in_dim, 3, 3, generator=g)}
    tensors["alpha"] = torch.tensor(2.0)
    module = load_adapter({f"lora_unet_x.{k}": (v * 0.1).to(dtype) if v.dim() else v
                           for k, v in tensors.items()}).modules["lora_unet_x"]
    weight = (torch.randn(out_dim, in_dim, 3, 3, generator=g) * 0.02).to(dtype)
    return module, weight


@pytest.mark.parametrize("tucker", [False, True], ids=["flat conv", "tucker conv"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_loha_one_pass_equals_the_row_path(native_on, monkeypatch, tucker, dtype):
    """LoHa with the native kernel gives the row path's bits (widen, multiply-add, narrow), in
    several row blocks and in place."""
    module, weight = loha_module(tucker, dtype)
    monkeypatch.setattr(rebuild, "CHUNK_ELEMENTS", 5 * 90)  # several row blocks of 5 rows
    out = torch.empty_like(weight)
    assert module.write_patched(out, weight, 0.8)
    rows = weight.float().view(24, -1)
    with module.float_factors():
        for chunk in rebuild.row_chunks(24, 90, budget=5 * 90):
            module.add_rows(rows[chunk], chunk.start, chunk.stop, 0.8)
    assert torch.equal(out, rows.view(weight.shape).to(dtype))
    in_place = weight.clone()
    assert module.write_patched(in_place, in_place, 0.8)
    assert torch.equal(in_place, out)


def test_loha_one_pass_is_not_taken_where_it_cannot_be(native_on):
    module, weight = loha_module(False)
    out = torch.full_like(weight, 7.0)
    assert not module.write_patched(out, weight, 0.0)
    assert not module.write_patched(out.float(), weight.float(), 1.0)  # float32: PyTorch's multiply-add
    assert not module.write_patched(out, weight.float(), 1.0)  # dtypes differ
    strided = weight.transpose(2, 3)
    assert not module.write_patched(torch.empty_like(strided), strided, 1.0)
    assert bool((out == 7.0).all())


@pytest.mark.parametrize("variant, load", [("loha", "load_loha"), ("loha_tucker", "load_loha"),
                                           ("lokr_f4", "load_lokr")])
@pytest.mark.parametrize("fuse", [False, True])
def test_pipeline_native_equals_pytorch_kernels(lycoris_file, tmp_path, monkeypatch, native_on, variant, load, fuse):
    """A real fp16 LyCORIS file on an fp16 tiny SDXL: every layer goes through the native kernels,
    and load, strength change and unload give PyTorch's kernels' bits exactly."""
    path = lycoris_file("sdxl", variant, "fp16").path
    taken = []
    real = native.kron_add if variant.startswith("lokr") else native.hadamard_add

    def spy(*args):
        taken.append(1)
        return real(*args)

    monkeypatch.setattr(native, real.__name__, spy)
    fast = lohakr.enable(make_pipe("sdxl", tmp_path, torch.float16), fuse=fuse)
    _, original = layer_weights(fast)
    getattr(fast, load)(path, "a")
    assert taken
    monkeypatch.setattr(native, "_state", {"library": None, "reason": "off for this test"})
    slow = lohakr.enable(make_pipe("sdxl", tmp_path, torch.float16), fuse=fuse)
    getattr(slow, load)(path, "a")
    _, got = layer_weights(fast)
    _, want = layer_weights(slow)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(got[k], original[k]) for k in want)
    if fuse:
        return
    monkeypatch.undo()  # kernels back on for the strength change
    monkeypatch.setattr(native, real.__name__, spy)
    taken.clear()
    fast.set_lycoris_strength("a", -0.4)
    assert taken
    monkeypatch.setattr(native, "_state", {"library": None, "reason": "off for this test"})
    slow.set_lycoris_strength("a", -0.4)
    _, got = layer_weights(fast)
    _, want = layer_weights(slow)
    assert all(torch.equal(got[k], want[k]) for k in want)
    fast.unload_lycoris("a")
    _, restored = layer_weights(fast)
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_off_by_environment(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("LOHAKR_NATIVE", "0")
    assert not native.usable(torch.empty(1, dtype=torch.float16))
    assert native.status() == "native CPU kernels: off, off by LOHAKR_NATIVE=0"
    module, weight = loha_module(False)
    assert not module.write_patched(torch.empty_like(weight), weight, 1.0)


def test_no_compiler_and_a_failing_build_fall_back_and_say_why(monkeypatch, tmp_path, caplog):
    if native._unsupported_reason():
        pytest.skip(native._unsupported_reason())
    monkeypatch.setenv("LOHAKR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "no-such-compiler-lohakr")
    assert not native.usable(torch.empty(1, dtype=torch.float16))
    assert native.status() == "native CPU kernels: off, no C compiler found (set CC to one)"

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "false")  # exists, fails
    with caplog.at_level("WARNING", logger="lohakr"):
        assert not native.usable(torch.empty(1, dtype=torch.float16))
    assert "build failed" in native.status()
    assert "native CPU kernels unavailable" in caplog.text
    assert not list(tmp_path.glob("*.so"))
    # Patching still works, through PyTorch's kernels, with the same bits.
    module, weight = loha_module(False)
    out = torch.empty_like(weight)
    _write_weight(out, weight, [(None, module, 0.5)], rebuild.Scratch())
    reference = weight.float()
    module.add_to(reference, 0.5)
    assert torch.equal(out, reference.to(weight.dtype))


def test_a_build_is_cached_and_reused(native_on, monkeypatch, tmp_path):
    monkeypatch.setenv("LOHAKR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.usable(torch.empty(1, dtype=torch.float16))
    built = list(tmp_path.glob("lohakr_native_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt"))
    assert native.usable(torch.empty(1, dtype=torch.bfloat16))
    assert built[0].stat().st_mtime_ns == stamp
    assert native.status().startswith("native CPU kernels: on, compiled with ")


def test_a_dtype_whose_bits_differ_is_not_used(native_on, monkeypatch, caplog):
    """The check before first use: a kernel that rounded differently from PyTorch is refused for
    that dtype, with a warning and the reason in ``status()``."""
    monkeypatch.setattr(native, "_state", {"library": native._load(), "reason": "compiled"})
    real = native.hadamard_add

    def off_by_one_ulp(out, source, p, q, value):
        real(out, source, p, q, value)
        out.view(torch.int16)[0] += 1

    monkeypatch.setattr(native, "hadamard_add", off_by_one_ulp)
    with caplog.at_level("WARNING", logger="lohakr"):
        assert not native.usable(torch.empty(1, dtype=torch.float16))
    assert "differ from PyTorch for torch.float16" in caplog.text
    assert "not used for float16 (LoHa kernel, rows of 1)" in native.status()
    module, weight = loha_module(False)
    assert not module.write_patched(torch.empty_like(weight), weight, 1.0)
