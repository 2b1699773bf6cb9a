"""LoKr's one-pass patch (``apply.one_pass``): in the weight's own dtype, and bit for bit what the
float32 path gives; taken only where that holds, and never silently different. Both ways: the
native kernel (half/bfloat16, any factors) and PyTorch's multiply-add (exact factors only)."""

from __future__ import annotations

import pytest
import torch
from test_diffusers import layer_weights, make_pipe

from lohakr import load_adapter
from lohakr.loaders import apply, rebuild

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def lokr(w1, w2, dtype, name="lora_unet_x", **extra):
    """A LoKr module with full factors stored in ``dtype`` (as kohya and LyCORIS save them)."""
    tensors = {"lokr_w1": w1.to(dtype), "lokr_w2": w2.to(dtype), **extra}
    return load_adapter({f"{name}.{k}": v for k, v in tensors.items()}).modules[name]


def float32_path(module, weight, strength):
    """The reference: cast up, one float32 multiply-add per element as the row path does it, cast
    down once."""
    w1, w2 = module.factors_w1_w2("cpu")
    a, c = w1.shape
    b, width = w2.shape[0], w2[0].numel()
    work = weight.to(torch.float32, copy=True).view(a, b, c, width)
    work.addcmul_(w1.reshape(a, 1, c, 1), w2.reshape(1, b, 1, width), value=strength * module.scale)
    return work.view(weight.shape).to(weight.dtype)


CASES = {
    "linear": ((4, 3), (24, 40), (96, 120)),
    "conv 3x3": ((2, 4), (8, 5, 3, 3), (16, 20, 3, 3)),
    "conv 1x1": ((8, 2), (40, 16, 1, 1), (320, 32, 1, 1)),
    "long w2 rows": ((2, 3), (6, 300), (12, 900)),  # plain broadcast layout (rebuild.KRON_SHORT_RUN)
    "w2 tiled 3 of 6 times": ((2, 6), (5, 100), (10, 600)),  # runs of 300: the smallest tiling that suffices
    "w1 one column": ((4, 1), (6, 50), (24, 50)),
}


@pytest.fixture(params=["pytorch", "native"])
def kernels(request):
    """Each test twice: with PyTorch's kernels only, and with the native ones (skipped where they
    cannot be built)."""
    request.getfixturevalue("native_off" if request.param == "pytorch" else "native_on")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("strength", [1.0, 0.37, -1.5])
def test_one_operation_equals_the_float32_path_bit_for_bit(dtype, case, strength, kernels):
    w1_shape, w2_shape, weight_shape = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    module = lokr(torch.randn(w1_shape, generator=g), torch.randn(w2_shape, generator=g) * 0.05, dtype)
    weight = (torch.randn(weight_shape, generator=g) * 0.02).to(dtype)
    out = torch.empty_like(weight)
    assert apply.one_pass(out, weight, module, strength)
    assert torch.equal(out, float32_path(module, weight, strength))
    # In place (fuse=True) gives the same, and agrees with the materialised ΔW to float32 rounding.
    in_place = weight.clone()
    assert apply.one_pass(in_place, in_place, module, strength)
    assert torch.equal(in_place, out)
    expected = weight.float() + strength * module.delta(weight_shape)
    assert torch.allclose(out.float(), expected, rtol=0, atol=float(expected.abs().max()) * 2**-7)


def test_bf16_factors_on_an_fp16_model_take_the_path_only_when_exact(native_off):
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(96, 120, generator=g) * 0.02).half()
    exact = lokr(torch.randn(4, 3, generator=g), torch.randn(24, 40, generator=g) * 0.05, torch.bfloat16)
    tiny = lokr(torch.randn(4, 3, generator=g), torch.randn(24, 40, generator=g) * 1e-6, torch.bfloat16)
    assert apply.one_pass(torch.empty_like(weight), weight, exact, 1.0)  # bf16 values of normal size fit fp16
    out = torch.full_like(weight, 7.0)
    assert not apply.one_pass(out, weight, tiny, 1.0)  # 1e-6 loses bits as fp16 subnormals
    assert bool((out == 7.0).all())  # nothing written


def test_other_cases_are_left_to_the_float32_path(native_off):
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(96, 120, generator=g) * 0.02).half()
    full = lokr(torch.randn(4, 3, generator=g), torch.randn(24, 40, generator=g) * 0.05, torch.float16)
    low_rank = load_adapter({"lora_unet_x.lokr_w1": torch.randn(4, 3).half(),
                             "lora_unet_x.lokr_w2_a": torch.randn(24, 2).half(),
                             "lora_unet_x.lokr_w2_b": torch.randn(2, 40).half(),
                             "lora_unet_x.alpha": torch.tensor(1.0)}).modules["lora_unet_x"]
    dora = lokr(torch.randn(4, 3, generator=g), torch.randn(24, 40, generator=g) * 0.05, torch.float16,
                dora_scale=torch.rand(96, 1) + 0.5)
    out = torch.empty_like(weight)
    assert not apply.one_pass(out, weight, low_rank, 1.0)  # w2_a @ w2_b is float32, not fp16
    assert not apply.one_pass(out, weight, dora, 1.0)
    assert not apply.one_pass(out, weight, full, 0.0)
    assert not apply.one_pass(out, weight.float(), full, 1.0)  # dtypes differ
    strided = (torch.randn(120, 96) * 0.02).half().t()
    assert not apply.one_pass(torch.empty_like(weight), strided, full, 1.0)
    # On a float32 weight a low-rank product is exact as it is: one multiply-add, same bits.
    weight32 = weight.float()
    out32 = torch.empty_like(weight32)
    assert apply.one_pass(out32, weight32, low_rank, 0.7)
    reference32 = weight32.clone()
    apply.add_rows(reference32, 0, 96, low_rank, 0.7, apply.Workspace())
    assert torch.equal(out32, reference32)
    # add_to (ComfyUI's float32 weight) takes it and matches the row path.
    work = weight.float()
    reference = work.clone()
    apply.add_rows(reference, 0, 96, full, 0.5, apply.Workspace())
    apply.add_to(work, full, 0.5)
    assert torch.equal(work, reference)


def test_a_pytorch_that_rounds_twice_is_detected(monkeypatch, native_off):
    """The probe fails for a kernel that rounds the product before adding: the path is not taken."""
    real = torch.addcmul

    def rounds_twice(source, t1, t2, *, value=1.0, out=None):
        product = (t1.float() * t2.float() * value).to(source.dtype)
        return torch.add(source, product, out=out)

    rebuild.addcmul_rounds_once.cache_clear()
    monkeypatch.setattr(torch, "addcmul", rounds_twice)
    try:
        assert not rebuild.addcmul_rounds_once(torch.float16)
        assert rebuild.addcmul_rounds_once(torch.float32)
        module = lokr(torch.randn(4, 3), torch.randn(24, 40), torch.float16)
        weight = torch.randn(96, 120).half()
        assert not apply.one_pass(torch.empty_like(weight), weight, module, 1.0)
    finally:
        monkeypatch.setattr(torch, "addcmul", real)
        rebuild.addcmul_rounds_once.cache_clear()
    assert rebuild.addcmul_rounds_once(torch.float16)


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("variant", ["lokr_full", "lokr_f4"])
def test_pipeline_fp16_lokr_equals_the_row_path(lycoris_file, tmp_path, monkeypatch, fuse, variant, kernels):
    """A real fp16 LyCORIS LoKr file on an fp16 model: the one-pass path is taken for every layer
    (PyTorch's kernels: full w1 and w2 only; native: low-rank w2 too) and the weights equal the row
    path's bit for bit."""
    import lohakr

    if kernels == "pytorch" and variant != "lokr_full":
        pytest.skip("PyTorch's one-operation path needs factors exact in fp16 (full w1 and w2)")
    path = lycoris_file("sdxl", variant, "fp16").path
    taken = []
    real = apply.one_pass

    def spy(out, source, update, strength, workspace=None):
        done = real(out, source, update, strength, workspace)
        taken.append(done)
        return done

    monkeypatch.setattr(apply, "one_pass", spy)
    fast = lohakr.enable(make_pipe("sdxl", tmp_path, torch.float16), fuse=fuse)
    fast.load_lokr(path, "a")
    assert taken and all(taken)
    monkeypatch.setattr(apply, "one_pass", lambda *args: False)
    rows = lohakr.enable(make_pipe("sdxl", tmp_path, torch.float16), fuse=fuse)
    rows.load_lokr(path, "a")
    _, got = layer_weights(fast)
    _, want = layer_weights(rows)
    assert all(torch.equal(got[k], want[k]) for k in want)
    if not fuse:
        monkeypatch.setattr(apply, "one_pass", spy)
        fast.set_lycoris_strength("a", 0.3)
        rows.set_lycoris_strength("a", 0.3)
        _, got = layer_weights(fast)
        _, want = layer_weights(rows)
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("w1_cols, w2_shape", [(4, (6, 40)), (6, (6, 100)), (4, (6, 300))],
                         ids=["tiled", "partly tiled", "broadcast"])
@pytest.mark.parametrize("rows", [(0, 18), (6, 12), (7, 11), (12, 13)], ids=str)
def test_row_blocks_equal_the_whole_weight(w1_cols, w2_shape, rows):
    """``kron_add_rows`` on whole w2 blocks or within one block gives the rows ``kron_add`` gives
    for the whole weight (same products, same bits) and the materialised Kronecker product."""
    g = torch.Generator().manual_seed(3)
    w1, w2 = torch.randn(3, w1_cols, generator=g), torch.randn(*w2_shape, generator=g)
    weight = torch.randn(18, w1_cols * w2_shape[1], generator=g)
    operands = rebuild.kron_operands(w1, w2)
    whole = rebuild.kron_add(torch.empty_like(weight), weight, *operands, 0.3)
    start, stop = rows
    part = weight[start:stop].clone()
    rebuild.kron_add_rows(part, start, stop, *operands, 0.3)
    assert torch.equal(part, whole[start:stop])
    assert torch.allclose(whole, weight + 0.3 * rebuild.kron(w1, w2), rtol=1e-6, atol=1e-6)
    if stop - start > 6 and start % 6:
        with pytest.raises(ValueError, match="partially"):
            rebuild.kron_add_rows(weight.clone()[start:stop + 6], start, stop + 6, *operands, 0.3)


@pytest.mark.parametrize("rows, row_size, align, budget", [
    (96, 10, 24, 480),     # two blocks per slice
    (96, 10, 24, 100),     # a block is split into 3 equal parts (8 rows; 10 fit)
    (96, 10, 24, 70),      # 7 rows fit: 4 parts of 6
    (40, 1000, 8, 10),     # not even one row fits: one row per slice
    (50, 10, 1, 130),      # no alignment: 13 rows per slice
])
def test_row_chunks_cover_every_row_once_and_never_straddle_a_block(rows, row_size, align, budget):
    chunks = rebuild.row_chunks(rows, row_size, align=align, budget=budget)
    assert [r for c in chunks for r in range(c.start, c.stop)] == list(range(rows))
    fit = max(1, budget // row_size)
    for c in chunks:
        assert c.start // align == (c.stop - 1) // align or (c.start % align == 0 and c.stop % align == 0)
        assert c.stop - c.start <= max(fit, align if fit >= align else 0)
    if align > fit:  # equal parts of a block, not a budget-sized slice and a sliver
        assert len({c.stop - c.start for c in chunks}) <= 2


def test_blocks_too_big_for_a_row_block_stay_on_the_multiply_add_path(monkeypatch, native_off):
    """A conv LoKr whose w2 block is larger than a row block (SDXL's 1280×2560×3×3 with factor 8)
    is patched in parts of one block each, by multiply-adds: the Kronecker rows are never built,
    and the bits equal the whole-weight float32 multiply-add."""
    g = torch.Generator().manual_seed(5)
    module = load_adapter({"lora_unet_x.lokr_w1": torch.randn(2, 2, generator=g).half(),
                           "lora_unet_x.lokr_w2_a": (torch.randn(12, 2, generator=g) * 0.1).half(),
                           "lora_unet_x.lokr_w2_b": (torch.randn(2, 5, 3, 3, generator=g) * 0.1).half(),
                           "lora_unet_x.alpha": torch.tensor(1.0)}).modules["lora_unet_x"]
    weight = (torch.randn(24, 10, 3, 3, generator=g) * 0.02).half()
    monkeypatch.setattr(rebuild, "BROADCAST_CHUNK_ELEMENTS", 5 * 90)  # 5 of a block's 12 rows
    monkeypatch.setattr(rebuild, "kron_rows", lambda *a: pytest.fail("Kronecker rows were built"))
    out = torch.empty_like(weight)
    apply.patch(out, weight, [(module, 0.6)])
    assert torch.equal(out, float32_path(module, weight, 0.6))
