"""Test vectors of docs/format.md#test-vectors, exact, including the traps (Tucker orientation, kron
padding, fp16 overflow, full+full alpha inf, DoRA axes)."""

from __future__ import annotations

import pytest
import torch

from lohakr import AdapterShapeError, load_adapter
from lohakr.loaders import rebuild


def pat(shape, seed, dtype=torch.float32):
    """docs/format.md#pattern-generator: value i = (((7·i + seed) mod 11) − 5) / 4, row-major."""
    n = 1
    for d in shape:
        n *= d
    i = torch.arange(n, dtype=torch.int64)
    return (((7 * i + seed) % 11 - 5).to(torch.float64) / 4).reshape(shape).to(dtype)


def module_of(tensors, name="lora_unet_x", **kw):
    sd = {f"{name}.{k}": v for k, v in tensors.items()}
    return load_adapter(sd, **kw).modules[name]


def t(value, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype)


TV1 = dict(hada_w1_a=pat((4, 2), 1), hada_w1_b=pat((2, 6), 2), hada_w2_a=pat((4, 2), 3), hada_w2_b=pat((2, 6), 4))
TV1_EXPECTED = torch.tensor([
    [0.076171875, -0.5859375, 0.046875, -0.96875, -0.087890625, 0.068359375],
    [0.4375, 0.46484375, 0.0390625, -0.41015625, 0.0625, 0.125],
    [-0.03125, -0.15625, 0.0625, 0.28125, 0.15625, 0.03125],
    [0.1953125, 1.375, 0.03125, 0.1171875, -0.34375, 0.109375],
])
TV4 = dict(lokr_w1=pat((2, 2), 1), lokr_w2_a=pat((2, 1), 2), lokr_w2_b=pat((1, 3), 3))
TV4_EXPECTED = torch.tensor([
    [-0.1875, 0.46875, 0.09375, 0.140625, -0.3515625, -0.0703125],
    [0.25, -0.625, -0.125, -0.1875, 0.46875, 0.09375],
    [-0.046875, 0.1171875, 0.0234375, -0.234375, 0.5859375, 0.1171875],
    [0.0625, -0.15625, -0.03125, 0.3125, -0.78125, -0.15625],
])


def stats(x):
    x = x.double()
    return float(x.sum()), float(x.abs().sum()), float((x * x).sum())


def test_tv1_loha_linear():
    m = module_of({**TV1, "alpha": t(1.0)})
    assert m.kind == "loha" and m.rank == 2 and m.scale == 0.5 and not m.tucker
    d = m.delta((4, 6))
    assert torch.equal(d, TV1_EXPECTED)
    assert float(d.sum()) == 1.095703125


def test_tv2_loha_conv_flat():
    m = module_of(dict(hada_w1_a=pat((3, 2), 1), hada_w1_b=pat((2, 18), 2), hada_w2_a=pat((3, 2), 3),
                       hada_w2_b=pat((2, 18), 4), alpha=t(4.0)))
    assert m.scale == 2
    d = m.delta((3, 2, 3, 3))
    s, a, q = stats(d)
    assert s == 12.734375 and a == 86.0625 and q == pytest.approx(199.923706, abs=1e-6)
    assert torch.equal(d[1, 0], torch.tensor([[0.7109375, -0.234375, -2.734375], [0.0859375, 0.75, -2.375],
                                              [-0.3515625, 1.40625, 1.5234375]]))


def test_tv3_loha_conv_tucker():
    m = module_of(dict(hada_t1=pat((2, 2, 3, 3), 5), hada_w1_a=pat((2, 3), 1), hada_w1_b=pat((2, 2), 2),
                       hada_t2=pat((2, 2, 3, 3), 6), hada_w2_a=pat((2, 3), 3), hada_w2_b=pat((2, 2), 4),
                       alpha=t(2.0)))
    assert m.tucker and m.scale == 1 and m.weight_shape == (3, 2, 3, 3)
    d = m.delta((3, 2, 3, 3))
    s, a, q = stats(d)
    assert s == 0.605224609375
    assert a == pytest.approx(18.641357, abs=1e-6) and q == pytest.approx(18.307629, abs=1e-6)
    assert torch.equal(d[2, 1], torch.tensor([[0.0087890625, 0.009765625, -0.279296875],
                                              [-0.052734375, 0.0234375, -0.1904296875],
                                              [-0.1142578125, -0.1669921875, -0.1015625]]))


def test_tv4_lokr_linear_w2_low_rank():
    m = module_of({**TV4, "alpha": t(0.5)})
    assert m.kind == "lokr" and m.rank == 1 and m.scale == 0.5
    assert torch.equal(m.delta((4, 6)), TV4_EXPECTED)


@pytest.mark.parametrize("alpha_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tv5_lokr_full_full_ignores_alpha_even_inf(alpha_dtype):
    alpha = torch.tensor(100000.0).to(alpha_dtype)
    m = module_of(dict(lokr_w1=pat((2, 2), 1), lokr_w2=pat((2, 3), 2), alpha=alpha))
    assert m.rank is None and m.scale == 1
    d = m.delta((4, 6))
    assert torch.isfinite(d).all()
    assert torch.equal(d, torch.tensor([[0.75, -1, 0, -0.5625, 0.75, 0], [1, -0.75, 0.25, -0.75, 0.5625, -0.1875],
                                        [0.1875, -0.25, 0, 0.9375, -1.25, 0],
                                        [0.25, -0.1875, 0.0625, 1.25, -0.9375, 0.3125]]))


def test_tv6_lokr_decompose_both():
    m = module_of(dict(lokr_w1_a=pat((2, 1), 1), lokr_w1_b=pat((1, 2), 2), lokr_w2_a=pat((2, 1), 3),
                       lokr_w2_b=pat((1, 3), 4), alpha=t(2.0)))
    assert m.scale == 2
    assert torch.equal(m.delta((4, 6)), torch.tensor([
        [0.1875, 0.9375, -0.375, -0.25, -1.25, 0.5], [-0.46875, -2.34375, 0.9375, 0.625, 3.125, -1.25],
        [-0.140625, -0.703125, 0.28125, 0.1875, 0.9375, -0.375],
        [0.3515625, 1.7578125, -0.703125, -0.46875, -2.34375, 0.9375]]))


TV7 = dict(lokr_w1=pat((2, 2), 1), lokr_w2_a=pat((4, 1), 2), lokr_w2_b=pat((1, 36), 3))


def check_tv7(d):
    s, a, q = stats(d)
    assert s == 1.3125 and a == 218.96875 and q == pytest.approx(183.779297, abs=1e-6)
    assert torch.equal(d[5, 6], torch.tensor([[-0.9375, 0.3125, 1.5625], [-0.625, 0.625, -1.5625],
                                              [-0.3125, 0.9375, -1.25]]))


def test_tv7_lokr_conv_flat():
    check_tv7(module_of({**TV7, "alpha": t(1.0)}).delta((8, 8, 3, 3)))


def test_tv7_lokr_conv_flat_accepts_4d_w2_b():
    """LyCORIS' functional API layout (r, d, kh, kw) equals the stored 2-D (r, d·kh·kw)."""
    tensors = {**TV7, "lokr_w2_b": TV7["lokr_w2_b"].reshape(1, 4, 3, 3), "alpha": t(1.0)}
    check_tv7(module_of(tensors).delta((8, 8, 3, 3)))


def test_tv_bf16_equals_tv7():
    tensors = {k: v.to(torch.bfloat16) for k, v in TV7.items()}
    check_tv7(module_of({**tensors, "alpha": t(1.0, torch.bfloat16)}).delta((8, 8, 3, 3)))


def test_bf16_random_factors_against_fp32_reference():
    g = torch.Generator().manual_seed(0)
    f32 = dict(hada_w1_a=torch.randn(16, 4, generator=g), hada_w1_b=torch.randn(4, 24, generator=g),
               hada_w2_a=torch.randn(16, 4, generator=g), hada_w2_b=torch.randn(4, 24, generator=g))
    bf = {k: v.to(torch.bfloat16) for k, v in f32.items()}
    ref = module_of({**{k: v.float() for k, v in bf.items()}, "alpha": t(2.0)}).delta((16, 24))
    got = module_of({**bf, "alpha": t(2.0, torch.bfloat16)}).delta((16, 24))
    assert torch.equal(got, ref)  # upcast first: bf16 storage, fp32 math
    naive = ((bf["hada_w1_a"] @ bf["hada_w1_b"]) * (bf["hada_w2_a"] @ bf["hada_w2_b"])).float() * 0.5
    assert torch.allclose(naive, ref, rtol=1e-2, atol=1e-1)


def test_tv8_lokr_conv_tucker():
    m = module_of(dict(lokr_w1=pat((2, 2), 1), lokr_t2=pat((1, 1, 3, 3), 4), lokr_w2_a=pat((1, 4), 2),
                       lokr_w2_b=pat((1, 4), 3), alpha=t(1.0)))
    assert m.tucker and m.rank == 1 and m.scale == 1
    d = m.delta((8, 8, 3, 3))
    s, a, q = stats(d)
    assert s == 0.08203125 and a == pytest.approx(141.324219, abs=1e-6) and q == pytest.approx(105.768814, abs=1e-6)
    assert torch.equal(d[5, 6], torch.tensor([[0.078125, 0.390625, -0.15625], [0.15625, -0.390625, -0.078125],
                                              [0.234375, -0.3125, 0]]))


def test_tv9_lokr_conv_full_4d():
    m = module_of(dict(lokr_w1=pat((2, 2), 1), lokr_w2=pat((4, 4, 3, 3), 2), alpha=t(10000.0)))
    assert m.scale == 1
    d = m.delta((8, 8, 3, 3))
    s, a, q = stats(d)
    assert s == 1.3125 and a == 319.3125 and q == pytest.approx(286.675781, abs=1e-6)
    assert torch.equal(d[5, 6], torch.tensor([[-0.3125, 0.9375, -1.25], [0, 1.25, -0.9375],
                                              [0.3125, 1.5625, -0.625]]))


def test_tv10_dora_on_tv4_both_axes_and_strength():
    w0 = pat((4, 6), 7)
    out_axis = module_of({**TV4, "alpha": t(0.5), "dora_scale": torch.tensor([[1.0], [2.0], [0.5], [1.5]])})
    assert out_axis.dora_axis((4, 6)) == "out"
    a = out_axis.patched_weight(w0, 1.0)
    assert float((a * a).sum()) == pytest.approx(7.5, abs=1e-5)
    assert torch.allclose(a[0], torch.tensor([0.153685, -0.015368, 0.660845, 0.192106, -0.541739, 0.457212]),
                          atol=1e-6)
    assert float(a.sum()) == pytest.approx(-2.331790, abs=1e-5)
    in_axis = module_of({**TV4, "alpha": t(0.5), "dora_scale": torch.tensor([[1.0, 2, 0.5, 1.5, 1, 2]])})
    assert in_axis.dora_axis((4, 6)) == "in"
    b = in_axis.patched_weight(w0, 1.0)
    assert float((b * b).sum()) == pytest.approx(12.5, abs=1e-5)
    assert float(b.sum()) == pytest.approx(-0.623295, abs=1e-5)
    c = out_axis.patched_weight(w0, 0.5)
    assert float(c.sum()) == pytest.approx(-1.165895, abs=1e-5)
    # ComfyUI @a125cd84 normalises by ‖W0‖ on the output axis: that (d) must NOT be what we produce.
    assert float(a.sum()) != pytest.approx(-1.987135, abs=1e-3)
    assert torch.equal(out_axis.patched_weight(w0, 0.0), w0)


def test_dora_1d_scale_is_output_axis():
    m = module_of({**TV4, "alpha": t(0.5), "dora_scale": torch.tensor([1.0, 2.0, 0.5, 1.5])})
    assert m.dora_axis((4, 6)) == "out"
    ref = module_of({**TV4, "alpha": t(0.5), "dora_scale": torch.tensor([[1.0], [2.0], [0.5], [1.5]])})
    w0 = pat((4, 6), 7)
    assert torch.equal(m.patched_weight(w0), ref.patched_weight(w0))


def test_alpha_missing_gives_scale_one():
    m = module_of(TV1)
    assert m.alpha is None and m.scale == 1
    assert torch.equal(m.delta((4, 6)), 2 * TV1_EXPECTED)


def test_alpha_zero_is_zero_with_warning_or_rank_on_request():
    with pytest.warns(UserWarning, match="alpha is 0"):
        m = module_of({**TV1, "alpha": t(0.0)})
    assert m.scale == 0 and torch.equal(m.delta((4, 6)), torch.zeros(4, 6))
    with pytest.warns(UserWarning):
        ly = module_of({**TV1, "alpha": t(0.0)}, zero_alpha_means_rank=True)
    assert torch.equal(ly.delta((4, 6)), 2 * TV1_EXPECTED)


@pytest.mark.parametrize("alpha, expected", [
    (torch.tensor(8.0, dtype=torch.float16), 2.0),
    (torch.tensor([8.0], dtype=torch.float16), 2.0),
    (torch.tensor(16, dtype=torch.int64), 4.0),
    (torch.tensor(0.1, dtype=torch.bfloat16), 0.10009765625 / 4),
    (torch.tensor(-4.0), -1.0),
])
def test_alpha_dtypes_and_shapes(alpha, expected):
    tensors = dict(hada_w1_a=pat((4, 4), 1), hada_w1_b=pat((4, 6), 2), hada_w2_a=pat((4, 4), 3),
                   hada_w2_b=pat((4, 6), 4), alpha=alpha)
    assert module_of(tensors).scale == expected


TUCKER_SQUARE = dict(hada_t1=pat((2, 2, 3, 3), 5), hada_w1_a=pat((2, 2), 1), hada_w1_b=pat((2, 2), 2),
                     hada_t2=pat((2, 2, 3, 3), 6), hada_w2_a=pat((2, 2), 3), hada_w2_b=pat((2, 2), 4))


def test_tucker_square_orientation_trap():
    d = module_of({**TUCKER_SQUARE, "alpha": t(2.0)}).delta((2, 2, 3, 3))
    assert float(d.sum()) == pytest.approx(-21.0402832, abs=1e-6)
    assert float((d * d).sum()) == pytest.approx(117.7706106, abs=1e-5)
    assert torch.equal(d[1, 0], torch.tensor([[-1.06201171875, 0.958740234375, -0.24609375],
                                              [-0.454833984375, 0.823974609375, 1.0283203125],
                                              [-0.446044921875, -1.0693359375, 1.1484375]]))
    wrong = rebuild.loha_product(TUCKER_SQUARE["hada_w1_a"].t(), TUCKER_SQUARE["hada_w1_b"],
                                 TUCKER_SQUARE["hada_w2_a"].t(), TUCKER_SQUARE["hada_w2_b"],
                                 TUCKER_SQUARE["hada_t1"], TUCKER_SQUARE["hada_t2"])
    assert float(wrong.sum()) == pytest.approx(-18.8879395, abs=1e-6)


def test_lokr_tucker_square_orientation_uses_t2_presence():
    """lokr_w2_a is (r, b) in Tucker mode even when r == b."""
    w2_a, w2_b, t2 = pat((2, 2), 2), pat((2, 2), 3), pat((2, 2, 3, 3), 4)
    m = module_of(dict(lokr_w1=pat((2, 2), 1), lokr_t2=t2, lokr_w2_a=w2_a, lokr_w2_b=w2_b, alpha=t(2.0)))
    expected = torch.einsum("ij,pqyx->ipjqyx", pat((2, 2), 1),
                            torch.einsum("ap,abyx,bq->pqyx", w2_a, t2, w2_b)).reshape(4, 4, 3, 3)
    assert torch.equal(m.delta((4, 4, 3, 3)), expected)


def test_lokr_w1_low_rank_w2_full():
    m = module_of(dict(lokr_w1_a=pat((2, 1), 1), lokr_w1_b=pat((1, 2), 2), lokr_w2=pat((2, 3), 3), alpha=t(3.0)))
    assert m.rank == 1 and m.scale == 3
    d = m.delta((4, 6))
    assert torch.equal(d, torch.tensor([[-1.125, 2.8125, 0.5625, 1.5, -3.75, -0.75], [-1.6875, 2.25, 0, 2.25, -3, 0],
                                        [0.84375, -2.109375, -0.421875, -1.125, 2.8125, 0.5625],
                                        [1.265625, -1.6875, 0, -1.6875, 2.25, 0]]))
    assert float(d.sum()) == -0.234375


def test_lokr_conv1x1_4d_w2_on_conv_and_linear():
    w2 = pat((3, 2, 1, 1), 2)
    m = module_of(dict(lokr_w1=pat((2, 2), 1), lokr_w2=w2, alpha=t(1.0)))
    conv = m.delta((6, 4, 1, 1))
    linear = m.delta((6, 4))
    assert torch.equal(conv.reshape(6, 4), linear)
    assert torch.equal(linear, torch.kron(pat((2, 2), 1), w2.reshape(3, 2)))


def test_kron_never_pads_leading():
    w1, w2 = pat((2, 2), 1), pat((4, 4, 3, 3), 2)
    assert torch.kron(w1, w2).shape == (4, 4, 6, 6)  # the trap
    assert rebuild.kron(w1, w2).shape == (8, 8, 3, 3)


def test_kron_conv1d_and_conv3d_use_trailing_axes():
    w1 = pat((2, 2), 1)
    for w2 in (pat((3, 2, 5), 2), pat((3, 2, 3, 3, 3), 2)):
        m = module_of(dict(lokr_w1=w1, lokr_w2=w2))
        d = m.delta((6, 4, *w2.shape[2:]))
        for i in range(2):
            for j in range(2):
                assert torch.equal(d[i * 3:(i + 1) * 3, j * 2:(j + 1) * 2], w1[i, j] * w2)


def test_loha_tucker_conv1d():
    t1, t2 = pat((2, 2, 5), 5), pat((2, 2, 5), 6)
    a1, b1, a2, b2 = pat((2, 3), 1), pat((2, 4), 2), pat((2, 3), 3), pat((2, 4), 4)
    m = module_of(dict(hada_t1=t1, hada_w1_a=a1, hada_w1_b=b1, hada_t2=t2, hada_w2_a=a2, hada_w2_b=b2))
    expected = torch.einsum("ip,ijk,jq->pqk", a1, t1, b1) * torch.einsum("ip,ijk,jq->pqk", a2, t2, b2)
    assert torch.allclose(m.delta((3, 4, 5)), expected, rtol=0, atol=1e-6)


def test_tv_ovf_fp16_overflow_is_avoided():
    h = torch.float16
    m = module_of(dict(hada_w1_a=t([[300.0], [1.0]], h), hada_w1_b=t([[1.0, 2.0]], h),
                       hada_w2_a=t([[300.0], [1.0]], h), hada_w2_b=t([[1.0, 1.0]], h), alpha=t(0.015625, h)))
    base = torch.zeros(2, 2, dtype=h)
    assert torch.equal(m.delta((2, 2)), torch.tensor([[1406.25, 2812.5], [0.015625, 0.03125]]))
    assert torch.equal(m.patched_weight(base), torch.tensor([[1406, 2812], [0.015625, 0.03125]], dtype=h))


def test_double_scale_reference_is_not_ours():
    """LyCORIS' merge bakes s²·R (docs/format.md#lycoris-double-scale): 0.5×TV1 for alpha 1, rank 2. We give TV1."""
    d = module_of({**TV1, "alpha": t(1.0)}).delta((4, 6))
    assert torch.equal(d, TV1_EXPECTED) and not torch.equal(d, 0.5 * TV1_EXPECTED)


def test_shape_checks_name_the_module():
    m = module_of({**TV4, "alpha": t(0.5)}, name="lora_unet_foo")
    assert m.check_target((4, 6)) is None
    assert "ΔW is (4, 6)" in m.check_target((6, 4))
    with pytest.raises(AdapterShapeError, match="lora_unet_foo"):
        m.delta((6, 4))


def test_strength_is_linear_and_cast_once():
    m = module_of({**TV1, "alpha": t(1.0)})
    base = pat((4, 6), 9)
    out = m.patched_weight(base.to(torch.float16), 0.75)
    expected = (base + 0.75 * TV1_EXPECTED).to(torch.float16)
    assert out.dtype == torch.float16 and torch.equal(out, expected)
    assert torch.equal(m.patched_weight(base, 0.0), base)
