"""The optional native CPU kernels (``loaders/native/``): the same bits as PyTorch's float32 path
in every layout and dtype they take, used only after that is checked, and a clear fallback with the
reason when they cannot be built or used."""

from __future__ import annotations

import pytest
import torch
from test_diffusers import layer_weights, make_pipe

import lohakr
from lohakr import load_adapter
from lohakr.loaders import apply, native, rebuild

HALF_TYPES = [torch.float16, torch.bfloat16]


def recording(kernel, name: str, calls: list):
    """``kernel``, appending ``name`` to ``calls`` on every call."""
    def spy(*args):
        calls.append(name)
        return kernel(*args)

    return spy


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
def test_kron_kernel_equals_pytorch_bit_for_bit(vector_bits, native_on, monkeypatch, dtype, a, b, c, k, value,
                                                threads):
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
@pytest.mark.parametrize("size", [1, 7, 8, 9, 15, 16, 17, 25, 63, 64, 1000, 70001])
def test_hadamard_kernel_equals_pytorch_bit_for_bit(vector_bits, native_on, monkeypatch, dtype, size):
    monkeypatch.setattr(native, "PARALLEL_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(size)
    weight = (torch.randn(size, generator=g) * 0.02).to(dtype)
    p, q = torch.randn(size, generator=g), torch.randn(size, generator=g) * 0.01
    out = torch.empty_like(weight)
    native.hadamard_add(out, weight, p, q, 0.6180339887)
    assert torch.equal(out, weight.float().addcmul_(p, q, value=0.6180339887).to(dtype))


def test_special_values_round_as_pytorch_does(vector_bits, native_on):
    """Overflow to ±inf, subnormal results and signed zeros come out as PyTorch's casts give them,
    in full vectors of 8 and 16 lanes and in tails (the eight cases five times over: 40 elements)."""
    for dtype in HALF_TYPES:
        big = torch.finfo(dtype).max
        tiny = torch.finfo(dtype).tiny
        weight = torch.tensor([big, -big, tiny, -tiny, 0.0, -0.0, 1.0, 3 * tiny / 8] * 5, dtype=dtype)
        p = torch.tensor([big, big, -tiny / 4, tiny / 4, 0.0, -0.0, 1e-4, 1e-9] * 5)
        q = torch.ones(40)
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
        tensors = {"hada_w1_a": torch.randn(out_dim, r, generator=g),
                   "hada_w1_b": torch.randn(r, in_dim * 9, generator=g),
                   "hada_w2_a": torch.randn(out_dim, r, generator=g),
                   "hada_w2_b": torch.randn(r, in_dim, 3, 3, generator=g)}
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
    assert apply.one_pass(out, weight, module, 0.8)
    rows = weight.float().view(24, -1)
    workspace = apply.Workspace()
    for chunk in rebuild.row_chunks(24, 90, budget=5 * 90):
        apply.add_rows(rows[chunk], chunk.start, chunk.stop, module, 0.8, workspace)
    assert torch.equal(out, rows.view(weight.shape).to(dtype))
    in_place = weight.clone()
    assert apply.one_pass(in_place, in_place, module, 0.8)
    assert torch.equal(in_place, out)


def test_loha_one_pass_is_not_taken_where_it_cannot_be(native_on):
    module, weight = loha_module(False)
    out = torch.full_like(weight, 7.0)
    assert not apply.one_pass(out, weight, module, 0.0)
    assert not apply.one_pass(out, weight.float(), module, 1.0)  # dtypes differ
    strided = weight.transpose(2, 3)
    assert not apply.one_pass(torch.empty_like(strided), strided, module, 1.0)
    assert bool((out == 7.0).all())


@pytest.mark.parametrize("tucker", [False, True], ids=["flat conv", "tucker conv"])
def test_float32_loha_takes_the_fused_kernel_with_the_row_paths_bits(native_on, monkeypatch, tucker):
    """A float32 weight: one fused pass where the kernel is checked for float32, else (too small
    a layer) ``apply.one_pass`` declines and the row path (GEMM, PyTorch's multiply-add) patches it."""
    module, weight = loha_module(tucker, torch.float32)
    if not native.loha_fused_rank_ok(torch.float32, module.gemm_inner):
        pytest.skip(f"this machine's torch.bmm sums in another order; the GEMM path is used ({native.status()})")
    reference = weight.clone()
    apply.add_to(reference, module, 0.8)
    out = torch.empty_like(weight)
    assert apply.one_pass(out, weight, module, 0.8)
    assert torch.equal(out, reference)
    monkeypatch.setattr(native, "FUSED_MIN_ROWS", 25)  # 24 rows: too small now
    assert not apply.one_pass(out, weight, module, 0.8)


@pytest.mark.parametrize("variant, load", [("loha", "load_loha"), ("loha_tucker", "load_loha"),
                                           ("lokr_f4", "load_lokr")])
@pytest.mark.parametrize("fuse", [False, True])
def test_pipeline_native_equals_pytorch_kernels(lycoris_file, tmp_path, monkeypatch, native_on, variant, load, fuse):
    """A real fp16 LyCORIS file on an fp16 tiny SDXL: every layer goes through the native kernels,
    and load, strength change and unload give PyTorch's kernels' bits exactly."""
    path = lycoris_file("sdxl", variant, "fp16").path
    taken = []
    kernels = ["kron_add"] if variant.startswith("lokr") else ["hadamard_add", "loha_add"]
    assert native.usable(torch.empty(1, dtype=torch.float16))  # its own check done before the spies

    def spy_on_kernels():
        for name in kernels:
            monkeypatch.setattr(native, name, recording(getattr(native, name), name, taken))

    spy_on_kernels()
    fast = lohakr.enable(make_pipe("sdxl", tmp_path, torch.float16), fuse=fuse)
    _, original = layer_weights(fast)
    getattr(fast, load)(path, "a")
    assert taken
    if not variant.startswith("lokr") and native.loha_fused_rank_ok(torch.float16, 32):
        assert "loha_add" in taken  # the layers of 16+ rows and 64+ columns
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
    spy_on_kernels()
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
    assert not apply.one_pass(torch.empty_like(weight), weight, module, 1.0)


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
    apply.patch(out, weight, [(module, 0.5)])
    reference = weight.float()
    apply.add_to(reference, module, 0.5)
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
    assert not apply.one_pass(torch.empty_like(weight), weight, module, 1.0)


# -- the fused LoHa kernel (GEMMs, Hadamard product and update in one pass) ----------------------
def exact_fma32(a, b, c):
    """Correctly rounded float32 ``a·b + c``, independent of any BLAS: the product is exact in
    float64, TwoSum gives the float64 sum's rounding error, and a float64 sum that lands exactly on
    a float32 midpoint is resolved by that error's sign (plain double rounding would tie to even)."""
    p, c64 = a.double() * b.double(), c.double()
    s = p + c64
    v = s - p
    err = (p - (s - v)) + (c64 - v)
    f = s.float()
    g = torch.nextafter(f, torch.where(s > f.double(), torch.tensor(float("inf")), torch.tensor(float("-inf"))))
    tie = (s != f.double()) & (s == (f.double() + g.double()) / 2) & (err != 0)
    return torch.where(tie & ((err > 0) == (g > f)), g, f)


def sequential_sums(a, b):
    """``a @ b`` summed as ``acc = fma(a[:, k], b[k], acc)`` for k in order, from zero: the order the
    fused kernel documents (and this machine's torch.bmm uses for LoHa-sized products)."""
    acc = torch.zeros(a.shape[0], b.shape[1])
    for k in range(a.shape[1]):
        acc = exact_fma32(a[:, k:k + 1].expand_as(acc), b[k:k + 1].expand_as(acc), acc)
    return acc


def test_the_exact_fma_reference_resolves_double_rounding():
    # 1 + 2^-23 + (2^-24 - 2^-70): the float64 sum is the float32 midpoint, the true value is below
    c = torch.tensor([1 + 2.0**-23])
    a, b = torch.tensor([2.0**-12 * (1 + 2.0**-23)]), torch.tensor([2.0**-12 * (1 - 2.0**-23)])
    assert exact_fma32(a, b, c).item() == 1 + 2.0**-23
    assert (a.double() * b.double() + c.double()).float().item() == 1 + 2.0**-22  # what double rounding gives


def fused_case(rows, width, rank, tucker, seed):
    g = torch.Generator().manual_seed(seed)
    outs = (torch.randn(2, rank, rows, generator=g).transpose(1, 2) if tucker
            else torch.randn(2, rows, rank, generator=g))
    return outs, torch.randn(2, rank, width, generator=g) * 0.1, g


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("rows, width, rank, tucker", [
    (1, 1, 1, False), (2, 15, 3, True), (16, 64, 1, False), (17, 67, 5, True), (33, 1100, 32, False),
    (50, 1300, 16, True), (40, 2100, 64, False), (19, 300, 128, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_loha_kernel_sums_in_rank_order_and_rounds_once(native_on, monkeypatch, dtype, rows, width, rank,
                                                               tucker, threads):
    """``loha_add`` against a reference that uses no BLAS: each branch summed in rank order with
    exactly rounded fmas, then ``fma(value·p, q, w)`` and one rounding to the weight's dtype. Row
    and column tails, several packed panels, transposed (Tucker) factors, in place."""
    monkeypatch.setattr(native, "_threads", lambda elements: threads)
    outs, ins, g = fused_case(rows, width, rank, tucker, seed=rows * 7 + rank)
    weight = (torch.randn(rows, width, generator=g) * 0.02).to(dtype)
    value = torch.tensor(-0.7071067811865476, dtype=torch.float32)
    p, q = sequential_sums(outs[0], ins[0]), sequential_sums(outs[1], ins[1])
    expected = exact_fma32(value * p, q, weight.float()).to(dtype)
    out = torch.empty_like(weight)
    native.loha_add(out, weight, outs, ins, value.item())
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    native.loha_add(weight, weight, outs, ins, value.item())
    assert torch.equal(weight.view(torch.int16), expected.view(torch.int16))
    # float32 out (the mode the check before use reads sums in): a half rounding hides no bit here
    weight32 = torch.randn(rows, width, generator=g) * 0.02
    out32 = torch.empty_like(weight32)
    native._loha_add(out32, weight32, outs, ins, value.item(), dtype_code=0)
    assert torch.equal(out32.view(torch.int32), exact_fma32(value * p, q, weight32).view(torch.int32))


def test_fused_loha_kernel_gives_torch_bmm_bits_where_it_is_used(native_on):
    """Where the check before use admits it, the fused kernel gives the bits of the GEMM path:
    ``torch.bmm``, then PyTorch's multiply-add, then one rounding."""
    if not all(native.loha_fused_rank_ok(torch.float16, rank) for rank in (4, 16, 32)):
        pytest.skip(f"this machine's torch.bmm sums in another order; the GEMM path is used ({native.status()})")
    for rows, width, rank, tucker in [(16, 64, 4, False), (320, 2880, 16, True), (640, 1280, 32, False)]:
        outs, ins, g = fused_case(rows, width, rank, tucker, seed=rank)
        assert native.loha_fused(torch.float16, rows, width, rank)
        weight = (torch.randn(rows, width, generator=g) * 0.02).half()
        both = torch.bmm(outs, ins)
        out = torch.empty_like(weight)
        native.loha_add(out, weight, outs, ins, 0.45)
        assert torch.equal(out, weight.float().addcmul_(both[0], both[1], value=0.45).half())


def test_fused_loha_kernel_refuses_factors_that_do_not_fit(native_on):
    weight = torch.zeros(20, 70, dtype=torch.float16)
    with pytest.raises(ValueError, match="do not fit"):
        native.loha_add(weight, weight, torch.ones(2, 20, 4), torch.ones(2, 4, 71), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        native.loha_add(weight, weight, torch.ones(2, 19, 4), torch.ones(2, 4, 70), 1.0)
    with pytest.raises(ValueError, match="do not fit"):  # rank 0: nothing to sum
        native.loha_add(weight, weight, torch.ones(2, 20, 0), torch.ones(2, 0, 70), 1.0)
    with pytest.raises(ValueError, match="float32"):
        native.loha_add(weight, weight, torch.ones(2, 20, 4, dtype=torch.float64), torch.ones(2, 4, 70), 1.0)
    assert bool((weight == 0).all())


def test_fused_loha_check_limits_the_rank_and_says_so(native_on, monkeypatch):
    """A machine whose GEMM sums differently at rank 32: the fused kernel is not used at that rank,
    ``status()`` says so, and a rank-32 layer takes the GEMM path with the same bits."""
    monkeypatch.setattr(native, "_state", {"library": native._load(), "reason": "compiled"})
    real = native._fused_check
    def differs_from_32(dtype, rank):
        return f"rank {rank}: differs (test)" if rank >= 32 else real(dtype, rank)

    monkeypatch.setattr(native, "_fused_check", differs_from_32)
    assert native.loha_fused_rank_ok(torch.float16, 16) and not native.loha_fused_rank_ok(torch.float16, 32)
    assert "float16 LoHa GEMMs fused at rank 16, not at rank 32 (rank 32: differs (test))" in native.status()
    assert native.usable(torch.empty(1, dtype=torch.float16))  # its own check done before the spies
    calls = []
    for name in ("loha_add", "hadamard_add"):
        monkeypatch.setattr(native, name, recording(getattr(native, name), name, calls))
    for rank, taken in ((16, "loha_add"), (32, "hadamard_add")):
        g = torch.Generator().manual_seed(rank)
        module = load_adapter({"lora_unet_x.hada_w1_a": torch.randn(40, rank, generator=g) * 0.1,
                               "lora_unet_x.hada_w1_b": torch.randn(rank, 96, generator=g) * 0.1,
                               "lora_unet_x.hada_w2_a": torch.randn(40, rank, generator=g) * 0.1,
                               "lora_unet_x.hada_w2_b": torch.randn(rank, 96, generator=g) * 0.1,
                               "lora_unet_x.alpha": torch.tensor(4.0)}).modules["lora_unet_x"]
        weight = (torch.randn(40, 96, generator=g) * 0.02).half()
        calls.clear()
        out = torch.empty_like(weight)
        assert apply.one_pass(out, weight, module, 0.9)
        assert calls == [taken]
        reference = weight.float()
        apply.add_to(reference, module, 0.9)
        assert torch.equal(out, reference.half())


@pytest.mark.parametrize("rows, width", [(15, 200), (40, 63)])
def test_fused_loha_kernel_is_not_used_below_its_smallest_size(native_on, monkeypatch, rows, width):
    """Below 16 rows or 64 columns torch.bmm orders its sums differently on this machine; such a
    layer takes the GEMM path (and the one-pass add)."""
    monkeypatch.setattr(native, "loha_add", lambda *a: pytest.fail("fused kernel used"))
    g = torch.Generator().manual_seed(rows)
    module = load_adapter({"lora_unet_x.hada_w1_a": torch.randn(rows, 4, generator=g),
                           "lora_unet_x.hada_w1_b": torch.randn(4, width, generator=g),
                           "lora_unet_x.hada_w2_a": torch.randn(rows, 4, generator=g),
                           "lora_unet_x.hada_w2_b": torch.randn(4, width, generator=g)}).modules["lora_unet_x"]
    weight = torch.randn(rows, width, generator=g).half()
    out = torch.empty_like(weight)
    assert apply.one_pass(out, weight, module, 0.5)
    reference = weight.float()
    apply.add_to(reference, module, 0.5)
    assert torch.equal(out, reference.half())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_a_stack_takes_the_fused_kernel_with_pytorchs_bits(lycoris_file, tmp_path, monkeypatch, native_on, dtype):
    """Several adapters on one weight are summed in float32 row blocks; there each LoHa's rows take
    the fused kernel in float32, and the weights get PyTorch's kernels' bits."""
    if not native.loha_fused_rank_ok(torch.float32, 32):
        pytest.skip(f"this machine's torch.bmm sums in another order; the GEMM path is used ({native.status()})")
    files = [lycoris_file("sdxl", v, "fp16").path for v in ("loha", "loha_tucker", "lokr_f4")]
    assert native.usable(torch.empty(1, dtype=torch.float16))  # its own check done before the spy
    row_blocks = []
    real = native.loha_add
    monkeypatch.setattr(native, "loha_add", lambda out, *a: (row_blocks.append(out.dtype), real(out, *a))[1])

    def stacked():
        pipe = lohakr.enable(make_pipe("sdxl", tmp_path, dtype))
        with pipe.lycoris_batch():
            for i, path in enumerate(files):
                pipe.load_lycoris(path, f"a{i}", strength=0.5 - 0.75 * i)
        return layer_weights(pipe)[1]

    fast = stacked()
    assert torch.float32 in row_blocks
    monkeypatch.setattr(native, "_state", {"library": None, "reason": "off for this test"})
    slow = stacked()
    assert all(torch.equal(fast[k], slow[k]) for k in slow)
