"""Name resolution on full-size SDXL / SD1.5 layouts (meta device) and on the tiny models."""

from __future__ import annotations

import pytest
import torch
from lycoris_oracle import make_models

from lohakr import BaseModelMismatchError, ModelLayout, load_adapter, resolve
from lohakr.loaders.reference_models import reference_layout


@pytest.fixture(scope="module")
def sdxl():
    return reference_layout("sdxl")


@pytest.fixture(scope="module")
def sd1():
    return reference_layout("sd1")


def test_tv_sdxl_names(sdxl):
    t = sdxl.resolve("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")
    assert t.weight_shape == (640, 2048) and t.block == "IN04"
    t = sdxl.resolve("lora_te2_text_model_encoder_layers_0_mlp_fc1")
    assert t.weight_shape == (5120, 1280) and t.block == "TE2"


@pytest.mark.parametrize("sgm, diffusers", [
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks_7_0_skip_connection", "down_blocks.2.resnets.0.conv_shortcut"),
    ("input_blocks_3_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("middle_block_0_in_layers_2", "mid_block.resnets.0.conv1"),
    ("middle_block_1_transformer_blocks_9_ff_net_2", "mid_block.attentions.0.transformer_blocks.9.ff.net.2"),
    ("middle_block_2_emb_layers_1", "mid_block.resnets.1.time_emb_proj"),
    ("output_blocks_2_1_transformer_blocks_9_attn2_to_out_0",
     "up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0"),
    ("output_blocks_2_2_conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks_5_2_conv", "up_blocks.1.upsamplers.0.conv"),
    ("output_blocks_8_0_skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ("output_blocks_3_1_proj_out", "up_blocks.1.attentions.0.proj_out"),
    ("label_emb_0_2", "add_embedding.linear_2"),
    ("out_2", "conv_out"),
    ("input_blocks_0_0", "conv_in"),
    ("time_embed_0", "time_embedding.linear_1"),
])
def test_sdxl_sgm_examples(sdxl, sgm, diffusers):
    """docs/names-and-blocks.md#sdxl-unet-table examples, checked against diffusers' own converter."""
    by_sgm = sdxl.resolve("lora_unet_" + sgm)
    assert by_sgm is not None and by_sgm.path == diffusers
    for alias in ("lora_unet_" + diffusers.replace(".", "_"), "lycoris_" + diffusers.replace(".", "_"),
                  "unet." + diffusers):
        assert sdxl.resolve(alias) is by_sgm


def test_sd15_upsampler_slot_and_blocks(sd1):
    """SD1.5 up_blocks.0 has no attention, so its upsampler is output_blocks.2.1.conv."""
    assert sd1.resolve("lora_unet_output_blocks_2_1_conv").path == "up_blocks.0.upsamplers.0.conv"
    assert sd1.resolve("lora_unet_output_blocks_2_2_conv") is None
    assert sd1.resolve("lora_unet_up_blocks_0_upsamplers_0_conv").block == "OUT02"
    assert sd1.resolve("lora_unet_down_blocks_0_attentions_0_proj_in").weight_shape == (320, 320, 1, 1)
    assert sd1.resolve("lora_unet_input_blocks_11_0_out_layers_3").path == "down_blocks.3.resnets.1.conv2"
    assert sd1.resolve("lora_te_text_model_encoder_layers_11_self_attn_q_proj").block == "TE"
    assert sd1.blocks == ["TE", *[f"IN{i:02d}" for i in range(12)], "M00",
                          *[f"OUT{i:02d}" for i in range(12)], "OTHER"]


def test_counts_match_kohya_defaults(sdxl, sd1):
    """722 SDXL transformer Linear modules + 72/192 text-encoder modules; 192 for SD1.5."""
    def transformer_modules(layout):
        return [t for t in layout.targets.values() if t.component == "unet" and ".attentions." in t.path
                and (".transformer_blocks." in t.path or t.path.endswith(("proj_in", "proj_out")))]

    assert len(transformer_modules(sdxl)) == 722
    assert len(transformer_modules(sd1)) == 192
    def te(layout, component):
        return [t for t in layout.targets.values() if t.component == component and
                (".self_attn." in t.path or ".mlp." in t.path)]

    assert len(te(sdxl, "text_encoder")) == 72 and len(te(sdxl, "text_encoder_2")) == 192
    assert sdxl.blocks == ["TE1", "TE2", *[f"IN{i:02d}" for i in range(9)], "M00",
                           *[f"OUT{i:02d}" for i in range(9)], "OTHER"]


def test_every_unet_layer_has_one_sgm_alias(sdxl, sd1):
    for layout in (sdxl, sd1):
        seen = {}
        for target in layout.targets.values():
            if target.component != "unet" or target.path.startswith(("conv_norm_out",)):
                continue
            assert target.sgm_path, target.path
            assert target.sgm_path not in seen, (target.path, seen.get(target.sgm_path))
            seen[target.sgm_path] = target.path
            assert layout.resolve("lora_unet_" + target.sgm_path.replace(".", "_")) is target


def test_transformers_4_and_5_clip_names(sdxl):
    a = sdxl.resolve("lora_te1_text_model_encoder_layers_3_mlp_fc2")
    b = sdxl.resolve("lora_te1_encoder_layers_3_mlp_fc2")
    c = sdxl.resolve("lora_te_text_model_encoder_layers_3_mlp_fc2")
    assert a is b is c and a.component == "text_encoder" and a.block == "TE1"
    assert sdxl.resolve("lora_te2_text_projection").component == "text_encoder_2"


def synthetic_loha(name, out_dim, in_dim, rank=2):
    g = torch.Generator().manual_seed(0)
    return {f"{name}.hada_w1_a": torch.randn(out_dim, rank, generator=g),
            f"{name}.hada_w1_b": torch.randn(rank, in_dim, generator=g),
            f"{name}.hada_w2_a": torch.randn(out_dim, rank, generator=g),
            f"{name}.hada_w2_b": torch.randn(rank, in_dim, generator=g),
            f"{name}.alpha": torch.tensor(1.0)}


def test_sd15_file_on_sdxl_is_refused_in_those_words(sdxl):
    tensors = {}
    for i, out_dim in ((1, 640), (2, 1280)):
        for which in ("to_k", "to_v"):
            tensors.update(synthetic_loha(f"lora_unet_down_blocks_{i}_attentions_0_transformer_blocks_0_attn2_{which}",
                                          out_dim, 768))
    tensors.update(synthetic_loha("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768))
    adapter = load_adapter(tensors)
    assert adapter.base_model == "sd1" and "has 768 inputs" in adapter.base_model_evidence
    with pytest.raises(BaseModelMismatchError, match=r"this is an SD1\.5 adapter \(.*attn2_to_k has 768 inputs\); "
                                                     r"the model is SDXL"):
        resolve(adapter, sdxl)
    _, report = resolve(adapter, sdxl, check_base_model=False)
    assert report.counts()["mismatched"] == 4


def test_sdxl_file_on_sd15_is_refused(sd1):
    tensors = synthetic_loha("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048)
    with pytest.raises(BaseModelMismatchError, match="this is an SDXL adapter .* the model is SD1.5"):
        resolve(load_adapter(tensors), sd1)


def test_tiny_sd15_lycoris_file_on_tiny_sdxl_is_refused(lycoris_file):
    fx = lycoris_file("sd1", "loha", metadata={"ss_base_model_version": "sd_v1"})
    layout = ModelLayout.from_diffusers(**make_models("sdxl").components)
    with pytest.raises(BaseModelMismatchError, match=r"this is an SD1\.5 adapter \(ss_base_model_version = sd_v1\); "
                                                     r"the model is SDXL"):
        resolve(load_adapter(fx.path), layout)


def test_peft_wrapped_layer_resolves_to_its_base_layer():
    from peft import LoraConfig, inject_adapter_in_model

    unet = make_models("sdxl").unet
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"]), unet)
    layout = ModelLayout.from_diffusers(unet=unet)
    target = layout.resolve("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")
    assert isinstance(target.layer, torch.nn.Linear) and target.path.endswith("attn1.to_q")
    assert not any(".base_layer" in t.path or ".lora_A" in t.path for t in layout.targets.values())


def test_unmatched_names_get_a_guessed_block(sdxl):
    adapter = load_adapter(synthetic_loha("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_zz", 640, 640))
    _, report = resolve(adapter, sdxl, check_base_model=False)
    assert report.outcomes[0].status == "unmatched" and report.outcomes[0].block == "IN04"


@pytest.mark.parametrize("family", ["sdxl", "sd1", "flux1", "chroma", "flux2", "sd3", "zimage", "qwenimage"])
def test_layout_tables_equal_the_models(family):
    """``layouts/<family>.json`` (what ``lohakr info`` reads, no torch) resolves every name to the
    same component, shape and block as the live model built from the same config."""
    from lohakr.loaders.reference_models import reference_layout

    table, live = reference_layout(family), reference_layout(family, from_model=True)

    def resolved(layout):
        return {alias: (t.component, t.weight_shape, t.block, t.sgm_path)
                for alias, key in layout.aliases.items() for t in [layout.targets[key]]}

    assert table.family == live.family and table.blocks == live.blocks
    assert resolved(table) == resolved(live)
    assert table.composites == live.composites


def test_the_command_line_knows_every_reference_layout():
    from lohakr.loaders import cli, reference_models

    assert cli.REFERENCE_FAMILIES == reference_models.FAMILIES
