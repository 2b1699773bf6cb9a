"""Transformers in real ComfyUI (``COMFYUI_DIR``): ComfyUI's own Flux.1 and Qwen-Image models, with their
original layer names (fused qkv and linear1 in Flux), patched by our loader from LyCORIS files in
diffusers names (SimpleTuner's ``lycoris_``) and in original names (kohya ``lora_unet_``), against
ComfyUI's native LoRA loader and against the diffusers side
(docs/names-and-blocks.md#fused-and-split-layers)."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_support import import_comfy, require_comfyui

require_comfyui()

from lycoris_oracle import lycoris_on, save_lycoris  # noqa: E402

from lohakr.loaders import tiny_models  # noqa: E402
from lohakr.loaders.families import FAMILIES  # noqa: E402
from lohakr.loaders.names import ModelLayout, _original_names, patchable_layers  # noqa: E402

STRENGTH = 0.8
# ComfyUI configs with the shapes of tiny_models.TRANSFORMER_CONFIGS
COMFY_CONFIGS = {
    "flux1": ("Flux", {"image_model": "flux", "guidance_embed": True, "in_channels": 4, "out_channels": 4,
                       "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2,
                       "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000,
                       "qkv_bias": True, "patch_size": 1}),
    "chroma": ("Chroma", {"image_model": "chroma", "in_channels": 4, "out_channels": 4, "context_in_dim": 32,
                          "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
                          "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 1, "qkv_bias": True, "in_dim": 8,
                          "out_dim": 32, "hidden_dim": 32, "n_layers": 2}),
    "qwenimage": ("QwenImage", {"image_model": "qwen_image", "patch_size": 2, "in_channels": 16, "out_channels": 4,
                                "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                                "joint_attention_dim": 16, "axes_dims_rope": (4, 6, 6)}),
    # MMDiT's width is 64 per block: 128 here; block 0 has SD3.5 Medium's second attention
    "sd3": ("SD3", {"in_channels": 4, "out_channels": 4, "pos_embed_scaling_factor": None, "patch_size": 2,
                    "depth": 2, "adm_in_channels": 64, "pos_embed_max_size": 32, "num_patches": 1024,
                    "context_embedder_config": {"target": "torch.nn.Linear",
                                                "params": {"in_features": 32, "out_features": 128}},
                    "qk_norm": "rms", "x_block_self_attn_layers": [0], "input_size": None}),
}
# Layers ComfyUI's native loader does not map in one naming (its Chroma map is Flux's, without the
# modulation approximator's diffusers names; docs/names-and-blocks.md#names)
NATIVE_GAPS = {("chroma", "diffusers"): "diffusion_model.distilled_guidance_layer."}
# diffusers twins whose shapes differ from tiny_models.TRANSFORMER_CONFIGS
TWIN_CONFIGS = {"sd3": {"attention_head_dim": 64, "num_attention_heads": 2, "caption_projection_dim": 128}}


def make_twin(family: str) -> torch.nn.Module:
    """The diffusers transformer with the shapes of ``build_comfy(family)``, seeded, random weights."""
    import diffusers

    class_name, config = tiny_models.TRANSFORMER_CONFIGS[family]
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**{**config, **TWIN_CONFIGS.get(family, {})}).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    import_comfy(loras)
    return loras


def build_comfy(family: str, seed: int = 0):
    """ComfyUI's own model of ``family`` as a ModelPatcher, seeded random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    name, unet_config = COMFY_CONFIGS[family]
    config = getattr(comfy.supported_models, name)(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "model.", device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # buffers too: SD3's pos_embed is left uninitialised
        for tensor in [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    model.requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def diffusers_twin(family: str, comfy_state: dict[str, torch.Tensor]):
    """The diffusers transformer with the ComfyUI model's weights, copied through the family table."""
    transformer = make_twin(family)
    layout = ModelLayout.from_transformer(transformer, FAMILIES[family])
    copied = set()
    with torch.no_grad():
        for original, _ in _original_names(FAMILIES[family], [p + "." for p, _ in patchable_layers(transformer)]):
            parts = layout.resolve_parts(original)
            key = f"diffusion_model.{original}.weight"
            if parts is None or key not in comfy_state:
                continue
            row = 0
            for part in parts:
                rows = slice(*(part.rows or (0, part.height)))
                part.target.layer.weight[rows] = comfy_state[key][row:row + part.height]
                copied.add(part.target.key)
                row += part.height
        for path, layer in patchable_layers(transformer):
            key = f"diffusion_model.{path}.weight"
            if f"transformer.{path}" not in copied and key in comfy_state:
                layer.weight.copy_(comfy_state[key])
                copied.add(f"transformer.{path}")
    assert len(copied) == len(layout.targets)
    return transformer


def loaded(model) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def assert_close(got, expected, what):
    err = float((got.float() - expected.float()).abs().max())
    allowed = 1e-5 * float(expected.abs().max())
    assert err <= allowed, (what, err, allowed)


def diffusers_named_file(loras, family: str, variant: str) -> str:
    """A LyCORIS file made on the diffusers model, as SimpleTuner writes it (``lycoris_<path>``)."""
    net = lycoris_on(make_twin(family), variant)
    save_lycoris(net, loras / f"{family}_{variant}_diffusers.safetensors")
    return f"{family}_{variant}_diffusers.safetensors"


def original_named_file(loras, family: str, variant: str) -> str:
    """A LyCORIS file made on ComfyUI's own model, in kohya's ``lora_unet_<original>`` names."""
    patcher = build_comfy(family)
    net = lycoris_on(patcher.model.diffusion_model, variant)
    save_lycoris(net, loras / f"{family}_{variant}_original.safetensors",
                 lambda name: name.replace("lycoris_", "lora_unet_", 1))
    return f"{family}_{variant}_original.safetensors"


@pytest.mark.parametrize("family", list(COMFY_CONFIGS))
@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr_f4", "lokr_full"])
@pytest.mark.parametrize("naming", ["diffusers", "original"])
def test_equals_comfyuis_native_loader(comfy, family, variant, naming):
    """Every module applies (Flux's q/k/v and MLP rows of fused layers included) and the weights equal
    what ComfyUI's LoraLoaderModelOnly makes of the same file."""
    import nodes as comfy_nodes
    from lohakr.nodes.definitions import run_loader_model_only

    make = diffusers_named_file if naming == "diffusers" else original_named_file
    filename = make(comfy, family, variant)
    model = build_comfy(family)
    (ours,), ui = run_loader_model_only(model, filename, STRENGTH)
    (report,) = json.loads(ui["lohakr_report"][0])
    assert report["counts"]["applied"] == len(report["outcomes"]) > 20, ui["text"][0]
    (native,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, filename, STRENGTH)
    ours_state, native_state = loaded(ours), loaded(native)
    pristine = build_comfy(family).model.state_dict()
    changed = [k for k in ours_state if not torch.equal(ours_state[k], pristine[k])]
    assert len(changed) >= 20
    gap = NATIVE_GAPS.get((family, naming))
    for key in ours_state:
        if gap and key.startswith(gap):  # ComfyUI has no diffusers name for these: it leaves them
            assert torch.equal(native_state[key], pristine[key]), key
            continue
        assert_close(ours_state[key], native_state[key], key)
    assert not gap or any(k.startswith(gap) for k in changed)  # and ours applies them
    ours.unpatch_model()
    for key, value in pristine.items():
        assert torch.equal(ours.model.state_dict()[key], value), key


@pytest.mark.parametrize("variant", ["lokr_dora_out", "loha_dora_out", "lokr_dora_in", "loha_dora_in"])
def test_dora_on_rows_of_fused_layers_equals_the_diffusers_side(comfy, variant):
    """DoRA files in diffusers names on ComfyUI's fused Flux layers: each of to_q/to_k/to_v normalises
    as its own layer (per output row, or per input column over its own rows), as on diffusers' split
    layers; the two hosts give the same weights."""
    import lohakr
    from lohakr.nodes.definitions import run_loader_model_only

    filename = diffusers_named_file(comfy, "flux1", variant)
    model = build_comfy("flux1")
    twin = diffusers_twin("flux1", model.model.state_dict())
    (ours,), _ = run_loader_model_only(model, filename, STRENGTH)
    state = loaded(ours)

    class Pipe:
        transformer = twin

    pipe = lohakr.enable(Pipe())
    report = pipe.load_lycoris(comfy / filename, strength=STRENGTH)
    assert report.complete
    layout = ModelLayout.from_transformer(twin, FAMILIES["flux1"])
    checked = 0
    for original, _ in _original_names(FAMILIES["flux1"], [p + "." for p, _ in patchable_layers(twin)]):
        parts = layout.resolve_parts(original)
        key = f"diffusion_model.{original}.weight"
        if parts is None or key not in state:
            continue
        rows = [part.target.layer.weight.detach()[slice(*(part.rows or (0, part.height)))] for part in parts]
        assert_close(state[key], torch.cat(rows), key)
        checked += 1
    assert checked >= 20


def test_blocks_and_block_weights_on_comfyuis_flux(comfy):
    from lohakr.nodes.comfy_bridge import comfy_layout
    from lohakr.nodes.definitions import run_loader_model_only

    model = build_comfy("flux1")
    layout = comfy_layout(model, None)
    assert layout.family == "flux1"
    assert layout.blocks == ["DOUBLE00", "DOUBLE01", "SINGLE00", "SINGLE01", "OTHER"]
    filename = diffusers_named_file(comfy, "flux1", "lokr")
    (ours,), _ = run_loader_model_only(model, filename, STRENGTH, "DOUBLE=0, SINGLE01=0")
    state, pristine = loaded(ours), build_comfy("flux1").model.state_dict()
    changed = [k for k in state if not torch.equal(state[k], pristine[k])]
    assert changed and not [k for k in changed if k.startswith(("diffusion_model.double_blocks.",
                                                                "diffusion_model.single_blocks.1."))]
    assert [k for k in changed if k.startswith("diffusion_model.single_blocks.0.")]


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_a_converted_lora_loads_in_comfyuis_native_loader_to_our_weights(comfy, family):
    """A LoKr in kohya's original names, converted exactly to a diffusers/PEFT LoRA (fused layers split
    into diffusers' layers), loads in ComfyUI's LoraLoaderModelOnly, which fuses it back through its
    own offsets, to the weights our node gives from the source file."""
    from safetensors.torch import save_file

    import nodes as comfy_nodes
    from lohakr import load_adapter
    from lohakr.loaders.convert import convert_adapter
    from lohakr.nodes.definitions import run_loader_model_only

    source = original_named_file(comfy, family, "lokr_f4")
    twin = make_twin(family)
    conversion = convert_adapter(load_adapter(comfy / source), ModelLayout.from_transformer(twin, FAMILIES[family]),
                                 "exact", dtype="fp32")
    save_file(conversion.tensors, str(comfy / f"{family}_converted.safetensors"), conversion.metadata)
    model = build_comfy(family)
    (ours,), _ = run_loader_model_only(model, source, STRENGTH)
    (native,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"{family}_converted.safetensors",
                                                                     STRENGTH)
    ours_state, native_state = loaded(ours), loaded(native)
    pristine = build_comfy(family).model.state_dict()
    assert len([k for k in ours_state if not torch.equal(ours_state[k], pristine[k])]) >= 20
    for key in ours_state:
        assert_close(native_state[key], ours_state[key], key)


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_the_save_node_writes_the_stack_as_one_lora_that_comfyui_loads_to_the_stacks_weights(comfy, family):
    """Two adapters (original and diffusers names) at their strengths and block weights, saved by
    our node as one exact LoRA in ComfyUI's own names; ComfyUI's native loader at strength 1 gives
    the weights our stack gives."""
    import nodes as comfy_nodes
    from lohakr.nodes.definitions import StackEntry, run_apply_stack, run_save_lora

    first = original_named_file(comfy, family, "lokr_f4")
    second = diffusers_named_file(comfy, family, "loha")
    stack = [StackEntry(first, 0.7, 1.0, "OTHER=0"), StackEntry(second, -0.4, 1.0)]
    model = build_comfy(family)
    (text,), ui = run_save_lora(model, stack, f"saved/{family}", "exact", 0.0, "fp32")
    assert "exact" in text and f"saved/{family}.safetensors".split("/")[-1] in text
    (again,), _ = run_save_lora(model, stack, f"saved/{family}", "exact", 0.0, "fp32")
    assert f"{family}_2.safetensors" in again  # never overwritten
    (ours, _), _ = run_apply_stack(model, stack)
    (native,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"saved/{family}.safetensors", 1.0)
    ours_state, native_state = loaded(ours), loaded(native)
    pristine = build_comfy(family).model.state_dict()
    assert len([k for k in ours_state if not torch.equal(ours_state[k], pristine[k])]) >= 20
    for key in ours_state:
        assert_close(native_state[key], ours_state[key], key)


def test_the_save_node_refuses_before_writing(comfy):
    """A name outside the loras folder, an empty stack and a bad rank are refused; nothing is written."""
    from lohakr.loaders.errors import LohakrError
    from lohakr.nodes.definitions import StackEntry, run_save_lora

    model = build_comfy("flux1")
    plain = diffusers_named_file(comfy, "flux1", "lokr")
    dora = diffusers_named_file(comfy, "flux1", "lokr_dora_out")
    before = sorted(p.name for p in comfy.rglob("*"))
    with pytest.raises(LohakrError, match="inside the loras folder"):
        run_save_lora(model, [StackEntry(plain, 1.0, 1.0)], "../outside")
    with pytest.raises(LohakrError, match="nothing to save"):
        run_save_lora(model, [StackEntry(plain, 0.0, 0.0)], "empty")
    with pytest.raises(LohakrError, match="rank 'many'"):
        run_save_lora(model, [StackEntry(dora, 1.0, 1.0)], "dora", "many")
    assert sorted(p.name for p in comfy.rglob("*")) == before


def test_the_save_node_bakes_dora_on_fused_rows_through_the_models_weights(comfy):
    """A DoRA LoKr in diffusers names patches rows of ComfyUI's fused Flux layers: saved, those layers
    are the SVD of what it does to the model's weights (exact rank); ComfyUI's loader gives our weights."""
    import nodes as comfy_nodes
    from lohakr.nodes.definitions import StackEntry, run_apply_stack, run_save_lora

    stack = [StackEntry(diffusers_named_file(comfy, "flux1", "lokr_dora_out"), 0.8, 1.0)]
    model = build_comfy("flux1")
    (text,), _ = run_save_lora(model, stack, "saved/flux_dora", "exact", 0.0, "fp32")
    assert "baked" in text
    (ours, _), _ = run_apply_stack(model, stack)
    (native,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, "saved/flux_dora.safetensors", 1.0)
    ours_state, native_state = loaded(ours), loaded(native)
    for key in ours_state:
        assert_close(native_state[key], ours_state[key], key)
