"""Real files from lycoris-lora, every variant, both families, fp32/fp16/bf16, both naming styles:
every module resolves, and our ΔW equals LyCORIS' module-forward semantics within 1e-5 relative."""

from __future__ import annotations

import pytest
import torch
from lycoris_oracle import DTYPES, VARIANTS

from lohakr import ModelLayout, load_adapter, resolve

FAMILIES = ["sdxl", "sd1"]


def max_rel(got: torch.Tensor, ref: torch.Tensor, scale_of: torch.Tensor) -> float:
    return float((got - ref).abs().max() / scale_of.abs().max().clamp_min(1e-30))


def check_parity(fx) -> None:
    adapter = load_adapter(fx.path)
    layout = ModelLayout.from_diffusers(**fx.models.components)
    matches, report = resolve(adapter, layout, strict=True)
    assert report.complete and len(matches) == len(fx.expected) == len(adapter)
    assert {m.module.name for m in matches} == set(fx.expected)
    for match in matches:
        ref = fx.expected[match.module.name]
        base = match.target.layer.weight.detach().float()
        assert torch.equal(base, ref.w0), match.module.name
        assert match.module.dora == ref.dora
        delta = match.module.delta(base.shape)
        err = max_rel(delta, ref.delta, ref.delta)
        assert err <= 1e-5, f"{fx.path.name} {match.module.name}: ΔW relative error {err:.2e}"
        patched = match.module.patched_weight(base, 1.0)
        err = max_rel(patched, ref.patched, ref.patched)
        assert err <= 1e-5, f"{fx.path.name} {match.module.name}: W' relative error {err:.2e}"
        assert ref.delta.abs().max() > 0  # the fixture really changes this layer


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_parity_diffusers_names(lycoris_file, family, variant, dtype):
    check_parity(lycoris_file(family, variant, dtype))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_kohya_names(lycoris_file, family, variant):
    """Real kohya files: ``lora_te1_text_model_…`` CLIP names, SGM UNet names on SDXL."""
    fx = lycoris_file(family, variant, "fp32", naming="kohya")
    if family == "sdxl":
        assert any(name.startswith("lora_unet_input_blocks_") for name in fx.expected)
    assert any("_text_model_encoder_" in name for name in fx.expected)
    check_parity(fx)


def test_variants_cover_every_layout(lycoris_file):
    """The grid really contains every variant of docs/format.md#factor-shapes (guards the fixtures themselves)."""
    seen = set()
    for variant in VARIANTS:
        adapter = load_adapter(lycoris_file("sdxl", variant).path)
        for m in adapter.modules.values():
            dims = len(m.weight_shape)
            conv = "k" if any(n.endswith(("conv1", "conv2", "conv", "conv_in", "conv_out")) for n in [m.name]) else "l"
            if m.kind == "loha":
                seen.add(("loha", "tucker" if m.tucker else f"flat{dims}-{conv}"))
            else:
                w1 = "w1lr" if m.w1_low_rank else "w1full"
                w2 = "tucker" if m.tucker else ("w2lr" if m.w2_low_rank else f"w2full{len(m.w2_shape)}d")
                seen.add(("lokr", w1, w2))
            if m.dora:
                seen.add(("dora", m.dora_axis(m.weight_shape if not m.tucker else m.weight_shape)))
    for required in [("loha", "tucker"), ("loha", "flat2-k"), ("loha", "flat2-l"),
                     ("lokr", "w1full", "w2lr"), ("lokr", "w1lr", "w2lr"), ("lokr", "w1full", "tucker"),
                     ("lokr", "w1full", "w2full4d"), ("lokr", "w1full", "w2full2d"), ("dora", "out")]:
        assert required in seen, required
