"""Our nodes in-process in real ComfyUI (``COMFYUI_DIR``): lazy patches through ComfyUI's patcher give
exactly the weights the shared loader predicts, equal ComfyUI's native LoraLoader where that one is
right, stack, block-weight, unpatch, and match the diffusers side patching the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_support import build_tiny_sdxl, comfy_key, diffusers_twin, import_comfy, require_comfyui

require_comfyui()

from lycoris_oracle import TinyModels, create_network, kohya_name, randomize  # noqa: E402

STRENGTH = 0.8


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    folder_paths = import_comfy(loras)
    return loras, folder_paths


def make_file(loras, variant: str, name: str | None = None, seed: int = 0) -> str:
    """A real LyCORIS file for the tiny ComfyUI model: made on its diffusers twin, kohya (SGM) names."""
    from safetensors.torch import load_file, save_file

    patcher, clip = build_tiny_sdxl()
    unet, te1, te2 = diffusers_twin(patcher.model.state_dict(), clip.cond_stage_model.state_dict())
    net = create_network(TinyModels("sdxl", unet, {"text_encoder": te1, "text_encoder_2": te2}), variant, loras)
    randomize(net, seed=seed, std=0.2)
    raw = loras / f"raw_{variant}.safetensors"
    net.save_weights(str(raw), torch.float32, {"ss_network_module": "lycoris.kohya",
                                               "ss_base_model_version": "sdxl_base_v1-0"})
    tensors = {}
    for key, value in load_file(str(raw)).items():
        module, _, suffix = key.partition(".")
        tensors[f"{kohya_name(module, 'sdxl')}.{suffix}"] = value
    raw.unlink()
    filename = f"{name or variant}.safetensors"
    save_file(tensors, str(loras / filename), {"ss_base_model_version": "sdxl_base_v1-0"})
    return filename


def loaded_state(model, clip):
    import comfy.model_management as mm

    mm.load_models_gpu([model])
    state = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    if clip is not None:
        clip.load_model()
        state.update({f"clip:{k}": v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()})
    return state


def predicted(loras, filename, model, clip, strength_model, strength_clip, block=lambda b: 1.0):
    """What the shared loader says each patched weight must be, from the originals."""
    from lohakr import load_adapter, resolve
    from lohakr.nodes.comfy_bridge import comfy_layout

    layout = comfy_layout(model, clip)
    matches, _ = resolve(load_adapter(loras / filename), layout)
    out = {}
    for m in matches:
        key = m.target.host_key if m.target.component == "unet" else f"clip:{m.target.host_key}"
        strength = (strength_model if m.target.component == "unet" else strength_clip) * block(m.block)
        # ComfyUI clones share one model that loading patches in place: start from the pristine weights.
        out[key] = m.module.patched_weight(build_state(key).detach().float(), strength)
    return out


def assert_close(got, expected, what):
    err = float((got.float() - expected.float()).abs().max())
    allowed = 1e-5 * float(expected.abs().max())
    assert err <= allowed, (what, err, allowed)


@pytest.mark.parametrize("variant", ["loha", "loha_tucker", "lokr", "lokr_tucker", "lokr_full", "lokr_both",
                                     "loha_dora_out", "lokr_dora_in"])
def test_loader_gives_predicted_weights(comfy, variant):
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    filename = make_file(loras, variant)
    model, clip = build_tiny_sdxl()
    expected = predicted(loras, filename, model, clip, STRENGTH, -0.5)
    (new_model, new_clip), ui = run_loader(model, filename, STRENGTH, "", clip=clip, strength_clip=-0.5)
    assert "modules applied" in ui["text"][0] and ui["lohakr_report"]
    state = loaded_state(new_model, new_clip)
    assert len(expected) > 50
    for key, value in expected.items():
        assert_close(state[key], value, key)
    # unpatching restores the originals exactly
    new_model.unpatch_model()
    original, _ = build_tiny_sdxl()
    for key, value in original.model.state_dict().items():
        assert torch.equal(new_model.model.state_dict()[key], value), key


@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr_full"])
def test_equals_native_lora_loader_where_native_is_right(comfy, variant):
    import nodes as comfy_nodes
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    filename = make_file(loras, variant)
    model, clip = build_tiny_sdxl()
    ours_model, ours_clip = run_loader(model, filename, STRENGTH, "", clip=clip, strength_clip=STRENGTH)[0]
    native_model, native_clip = comfy_nodes.LoraLoader().load_lora(model, clip, filename, STRENGTH, STRENGTH)
    ours, native = loaded_state(ours_model, ours_clip), loaded_state(native_model, native_clip)
    changed = [k for k in ours if not torch.equal(ours[k], build_state(k))]
    assert len(changed) > 50
    for key in ours:
        assert_close(ours[key], native[key], key)


_ORIGINAL: dict = {}


def build_state(key):
    if not _ORIGINAL:
        model, clip = build_tiny_sdxl()
        _ORIGINAL.update(model.model.state_dict())
        _ORIGINAL.update({f"clip:{k}": v for k, v in clip.cond_stage_model.state_dict().items()})
    return _ORIGINAL[key]


def test_stack_equals_chained_loaders_and_sum(comfy):
    from lohakr.nodes.definitions import run_apply_stack, run_loader, run_stack

    loras, _ = comfy
    a = make_file(loras, "loha", "stack_a", seed=1)
    b = make_file(loras, "lokr_tucker", "stack_b", seed=2)
    model, clip = build_tiny_sdxl()
    m1, c1 = run_loader(model, a, 0.7, "", clip=clip, strength_clip=0.3)[0]
    m1, c1 = run_loader(m1, b, -0.4, "", clip=c1, strength_clip=1.0)[0]
    (stack,), _ = run_stack(a, 0.7, 0.3, "")
    rows = json.dumps([{"name": b, "strength_model": -0.4, "strength_clip": 1.0}, {"name": a, "enabled": False}])
    (stack,), _ = run_stack(lora_stack=stack, rows=rows)
    assert len(stack) == 2 and tuple(stack[1]) == (b, -0.4, 1.0)
    m2, c2 = run_apply_stack(model, stack, clip=clip)[0]
    chained, stacked = loaded_state(m1, c1), loaded_state(m2, c2)
    expected_a = predicted(loras, a, model, clip, 0.7, 0.3)
    expected_b = predicted(loras, b, model, clip, -0.4, 1.0)
    for key in chained:
        assert torch.equal(chained[key], stacked[key]), key
        if key in expected_a or key in expected_b:
            base = build_state(key).float()
            delta = (expected_a.get(key, base) - base) + (expected_b.get(key, base) - base)
            assert_close(stacked[key], base + delta, key)


def test_other_packs_plain_tuples_work(comfy):
    from lohakr.nodes.definitions import run_apply_stack, run_loader

    loras, _ = comfy
    a = make_file(loras, "lokr", "plain_tuple")
    model, clip = build_tiny_sdxl()
    ours = loaded_state(*run_loader(model, a, 0.5, "", clip=clip, strength_clip=0.5)[0])
    theirs = loaded_state(*run_apply_stack(model, [(a, 0.5, 0.5)], clip=clip)[0])
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_block_weights_in04_zero_leaves_input_blocks_4_untouched(comfy):
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    a = make_file(loras, "loha", "blocks")
    model, clip = build_tiny_sdxl()
    state = loaded_state(*run_loader(model, a, 1.0, "IN04=0", clip=clip, strength_clip=1.0)[0])
    in04 = [k for k in state if k.startswith("diffusion_model.input_blocks.4.")]
    in05 = [k for k in state if k.startswith("diffusion_model.input_blocks.5.") and k.endswith(".weight")]
    assert in04 and all(torch.equal(state[k], build_state(k)) for k in in04)
    assert any(not torch.equal(state[k], build_state(k)) for k in in05)


def test_strength_zero_returns_inputs_untouched(comfy):
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    a = make_file(loras, "loha", "zero")
    model, clip = build_tiny_sdxl()
    (m, c), ui = run_loader(model, a, 0.0, "", clip=clip, strength_clip=0.0)
    assert m is model and c is clip and "strength 0" in ui["text"][0]
    (m, c), _ = run_loader(model, a, 1.0, "", clip=clip, strength_clip=0.0)
    assert m is not model and c is clip


def test_lowvram_partial_load_patches_lazily(comfy):
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    a = make_file(loras, "loha_tucker", "lowvram")
    model, clip = build_tiny_sdxl()
    expected = predicted(loras, a, model, clip, 1.0, 1.0)
    new_model = run_loader(model, a, 1.0, "", clip=clip, strength_clip=1.0)[0][0]
    new_model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    import comfy.utils

    checked = 0
    for key, value in expected.items():
        if not key.startswith("diffusion_model."):
            continue
        module = comfy.utils.get_attr(new_model.model, key.rsplit(".", 1)[0])
        functions = getattr(module, "weight_function", [])
        stored = comfy.utils.get_attr(new_model.model, key)
        assert torch.equal(stored, build_state(key))  # not patched in place: lazily, at use
        weight = stored.detach().clone()
        for function in functions:
            weight = function(weight)
        assert_close(weight, value, key)
        checked += 1
    new_model.unpatch_model()
    assert checked > 50


def test_errors_reach_the_node(comfy):
    from lohakr import BaseModelMismatchError, LohakrError
    from lohakr.nodes.definitions import run_info, run_loader

    loras, _ = comfy
    (loras / "broken.safetensors").write_bytes(b"\x00" * 10)
    model, clip = build_tiny_sdxl()
    with pytest.raises(LohakrError, match="broken.safetensors: not a safetensors file"):
        run_loader(model, "broken.safetensors", 1.0, "", clip=clip, strength_clip=1.0)
    with pytest.raises(LohakrError, match="not found in the loras folder"):
        run_loader(model, "missing.safetensors", 1.0, "", clip=clip, strength_clip=1.0)
    with pytest.raises(LohakrError, match="unknown block 'IN99'"):
        run_loader(model, make_file(loras, "loha", "err"), 1.0, "IN99=0", clip=clip, strength_clip=1.0)
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.hada_w1_a": torch.randn(640, 2, generator=g),
               f"{name}.hada_w1_b": torch.randn(2, 768, generator=g),
               f"{name}.hada_w2_a": torch.randn(640, 2, generator=g),
               f"{name}.hada_w2_b": torch.randn(2, 768, generator=g)},
              str(loras / "sd15.safetensors"))
    with pytest.raises(BaseModelMismatchError, match="SD1.5 adapter .* the model is SDXL"):
        run_loader(model, "sd15.safetensors", 1.0, "", clip=clip, strength_clip=1.0)
    (text,), ui = run_info("err.safetensors", model=model, clip=clip)
    assert "LoHa" in text and "coverage on sdxl" in text and ui["lohakr_info"]


def test_comfy_key_map_fallback_is_reported(comfy):
    from safetensors.torch import load_file, save_file

    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    a = make_file(loras, "loha", "fallback")
    tensors = load_file(str(loras / a))
    dotted = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q"
    old = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    renamed = {(dotted + k[len(old):] if k.startswith(old + ".") else k): v for k, v in tensors.items()}
    save_file(renamed, str(loras / "fallback2.safetensors"))
    model, clip = build_tiny_sdxl()
    (_, _), ui = run_loader(model, "fallback2.safetensors", 1.0, "", clip=clip, strength_clip=1.0)
    import json

    outcomes = json.loads(ui["lohakr_report"][0])[0]["outcomes"]
    fallback = [o for o in outcomes if o["module"] == dotted]
    assert fallback and fallback[0]["status"] == "applied" and fallback[0]["resolver"] == "comfy"


def test_same_weights_as_the_diffusers_side(comfy):
    """The same file on the same weights: ComfyUI's patched weights equal the diffusers engine's."""
    from lohakr import WeightPatcher, load_adapter, resolve
    from lohakr.loaders.names import ModelLayout, SgmNames
    from lohakr.loaders.patcher import PatchedAdapter
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    a = make_file(loras, "loha_tucker", "cross_host")
    model, clip = build_tiny_sdxl()
    pristine_model, pristine_clip = build_tiny_sdxl()
    unet, te1, te2 = diffusers_twin(pristine_model.model.state_dict(), pristine_clip.cond_stage_model.state_dict())
    comfy_state = loaded_state(*run_loader(model, a, 0.9, "", clip=clip, strength_clip=0.6)[0])
    layout = ModelLayout.from_diffusers(unet, te1, te2)
    matches, report = resolve(load_adapter(loras / a), layout, strict=True)
    patcher = WeightPatcher()
    patcher.add(PatchedAdapter("x", matches, report, {"unet": 0.9, "text_encoder": 0.6, "text_encoder_2": 0.6}))
    sgm = SgmNames(unet)
    for m in matches:
        key = comfy_key(m.target, sgm)
        assert_close(comfy_state[key], m.target.layer.weight.detach(), key)


def test_registration_uses_one_api(comfy, monkeypatch):
    import lohakr.nodes as nodes_pkg

    assert nodes_pkg.current_api_available()
    assert set(nodes_pkg.registration()) == {"comfy_entrypoint"}
    monkeypatch.setenv("LOHAKR_COMFY_API", "classic")
    names = nodes_pkg.registration()
    assert set(names) == {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"}
    assert set(names["NODE_CLASS_MAPPINGS"]) == {"LohakrLoader", "LohakrLoaderModelOnly", "LohakrStack",
                                                 "LohakrApplyStack", "LohakrSaveLora", "LohakrInfo"}
    inputs = names["NODE_CLASS_MAPPINGS"]["LohakrLoader"].INPUT_TYPES()
    assert "clip" in inputs["optional"] and inputs["required"]["strength_clip"][1]["min"] == -100.0


def test_fp8_weights_are_patched_through_comfyui(comfy):
    """fp8 (e4m3fn) UNet weights: ComfyUI hands our patch a float32 copy and rounds the result back."""
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    a = make_file(loras, "lokr", "fp8")
    model, clip = build_tiny_sdxl()
    expected = predicted(loras, a, model, clip, 1.0, 1.0)
    import comfy.utils

    keys = [k for k in expected if k.startswith("diffusion_model.")]
    with torch.no_grad():
        for key in keys:  # store the patched layers' weights in fp8, as fp8 checkpoints do
            layer = comfy.utils.get_attr(model.model, key.rsplit(".", 1)[0])
            layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
    originals = {k: comfy.utils.get_attr(model.model, k).detach().float().clone() for k in keys}
    new_model = run_loader(model, a, 1.0, "", clip=None)[0][0]
    new_model.patch_model(device_to=torch.device("cpu"))
    try:
        for key in keys:
            got = comfy.utils.get_attr(new_model.model, key)
            assert got.dtype == torch.float8_e4m3fn
            want = expected[key] - build_state(key).float() + originals[key]  # ΔW on the fp8 base
            step = torch.clamp(want.abs() / 8, min=2.0 ** -9)  # e4m3: 3 mantissa bits, subnormal step 2^-9
            assert bool(((got.float() - want).abs() <= step * 1.01).all()), key
            assert not torch.equal(got.float(), originals[key])
    finally:
        new_model.unpatch_model()



@pytest.mark.parametrize("variant", ["loha_tucker", "lokr"])
def test_a_converted_lora_loads_in_comfyuis_lora_loader_to_our_weights(comfy, variant):
    """``lohakr convert``'s exact LoRA, loaded by ComfyUI's own LoraLoader, gives the weights our
    loader gives from the LoHa/LoKr file."""
    from safetensors.torch import save_file

    import nodes as comfy_nodes
    from lohakr import load_adapter
    from lohakr.loaders.convert import convert_adapter
    from lohakr.nodes.comfy_bridge import comfy_layout
    from lohakr.nodes.definitions import run_loader

    loras, _ = comfy
    filename = make_file(loras, variant, name=f"to_convert_{variant}")
    model, clip = build_tiny_sdxl()
    conversion = convert_adapter(load_adapter(loras / filename), comfy_layout(model, clip), dtype="fp32")
    assert conversion.max_error <= 1e-5
    save_file(conversion.tensors, str(loras / f"converted_{variant}.safetensors"), conversion.metadata)
    ours = loaded_state(*run_loader(model, filename, STRENGTH, "", clip=clip, strength_clip=STRENGTH)[0])
    native = comfy_nodes.LoraLoader().load_lora(model, clip, f"converted_{variant}.safetensors", STRENGTH, STRENGTH)
    theirs = loaded_state(*native)
    changed = [k for k in ours if not torch.equal(ours[k], build_state(k))]
    assert len(changed) > 50
    for key in ours:
        assert_close(theirs[key], ours[key], key)


def test_the_save_node_writes_an_sdxl_stack_that_comfyuis_lora_loader_loads_to_the_stacks_weights(comfy):
    """A LoHa and a LoKr on MODEL and CLIP at different strengths and block weights, saved as one exact
    kohya LoRA by our node; ComfyUI's LoraLoader at strength 1 gives our stack's weights."""
    import nodes as comfy_nodes
    from lohakr.nodes.definitions import StackEntry, run_apply_stack, run_save_lora

    loras, _ = comfy
    stack = [StackEntry(make_file(loras, "loha"), 0.8, 0.5, "IN04=0"),
             StackEntry(make_file(loras, "lokr", name="lokr_b", seed=3), -0.6, 1.2)]
    model, clip = build_tiny_sdxl()
    (text,), _ = run_save_lora(model, stack, "saved/sdxl_stack", "exact", 0.0, "fp32", clip=clip)
    assert "exact" in text
    (ours_model, ours_clip), _ = run_apply_stack(model, stack, clip=clip)
    native_model, native_clip = comfy_nodes.LoraLoader().load_lora(model, clip, "saved/sdxl_stack.safetensors", 1.0,
                                                                   1.0)
    ours, native = loaded_state(ours_model, ours_clip), loaded_state(native_model, native_clip)
    assert len([k for k in ours if not torch.equal(ours[k], build_state(k))]) > 50
    for key in ours:
        assert_close(native[key], ours[key], key)


@pytest.mark.parametrize("variant", ["loha_dora_out", "lokr_dora_in"])
def test_a_converted_dora_file_does_in_comfyui_what_its_source_does(comfy, variant):
    """docs/format.md#dora-in-a-lora: exact factors plus ``dora_scale``; ComfyUI's LoraLoader applies the
    converted LoRA exactly as it applies the source LoHa/LoKr (its own DoRA rules for both)."""
    from safetensors.torch import save_file

    import nodes as comfy_nodes
    from lohakr import load_adapter
    from lohakr.loaders.convert import convert_adapter
    from lohakr.nodes.comfy_bridge import comfy_layout

    loras, _ = comfy
    filename = make_file(loras, variant, name=f"dora_source_{variant}")
    model, clip = build_tiny_sdxl()
    conversion = convert_adapter(load_adapter(loras / filename), comfy_layout(model, clip), dtype="fp32")
    assert any(k.endswith(".dora_scale") for k in conversion.tensors)
    save_file(conversion.tensors, str(loras / f"dora_converted_{variant}.safetensors"), conversion.metadata)
    source = loaded_state(*comfy_nodes.LoraLoader().load_lora(model, clip, filename, STRENGTH, STRENGTH))
    converted = loaded_state(*comfy_nodes.LoraLoader().load_lora(model, clip, f"dora_converted_{variant}.safetensors",
                                                                 STRENGTH, STRENGTH))
    assert len([k for k in source if not torch.equal(source[k], build_state(k))]) > 50
    for key in source:
        assert_close(converted[key], source[key], key)
