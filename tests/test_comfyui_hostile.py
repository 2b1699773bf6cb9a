"""Hostile and malformed files through our ComfyUI nodes in real ComfyUI (``COMFYUI_DIR``): each is
refused with our error naming the file before any patch is added, and the inputs stay untouched;
patching does not depend on grad mode; a layer named twice is patched once."""

from __future__ import annotations

import json
import math

import pytest
import torch
from comfy_support import build_tiny_sdxl, import_comfy, require_comfyui
from safetensors.torch import save_file

require_comfyui()

from lohakr import AdapterFormatError, BaseModelMismatchError, LohakrError  # noqa: E402
from lohakr.loaders.errors import NonFiniteUpdateError, NothingToApplyError  # noqa: E402

Q = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
K = "input_blocks.4.1.transformer_blocks.0.attn1.to_k"
SDXL = {"ss_base_model_version": "sdxl_base_v1-0"}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile_loras")
    import_comfy(folder)
    return folder


def kohya(sgm_path: str) -> str:
    return "lora_unet_" + sgm_path.replace(".", "_")


def shape_of(model, sgm_path: str) -> tuple[int, ...]:
    return tuple(model.model.state_dict()[f"diffusion_model.{sgm_path}.weight"].shape)


def lokr(name: str, shape, value: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out, inn = shape
    return {f"{name}.lokr_w1": torch.randn(4, 4, generator=g) * value,
            f"{name}.lokr_w2": torch.randn(out // 4, inn // 4, generator=g) * value}


def loha(name: str, shape, value: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    out, inn = shape
    return {f"{name}.hada_w1_a": torch.randn(out, 2, generator=g) * value,
            f"{name}.hada_w1_b": torch.randn(2, inn, generator=g) * value,
            f"{name}.hada_w2_a": torch.randn(out, 2, generator=g) * value,
            f"{name}.hada_w2_b": torch.randn(2, inn, generator=g) * value,
            f"{name}.alpha": torch.tensor(2.0)}


def save(loras, name: str, tensors, metadata=SDXL) -> str:
    save_file(tensors, str(loras / name), metadata)
    return name


def state(model, clip) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    out.update({f"clip:{k}": v.detach().clone() for k, v in clip.cond_stage_model.state_dict().items()})
    return out


HOSTILE = {
    "checkpoint": (lambda m: {"model.diffusion_model.out.2.weight": torch.ones(4, 4),
                              "model.diffusion_model.out.2.bias": torch.ones(4)},
                   AdapterFormatError, "this is a model checkpoint, not an adapter"),
    "overflow": (lambda m: lokr(kohya(Q), shape_of(m, Q), value=1e20), NonFiniteUpdateError, "factor overflow"),
    "nan scalar": (lambda m: {**loha(kohya(Q), shape_of(m, Q)), f"{kohya(Q)}.scalar": torch.tensor(math.nan)},
                   AdapterFormatError, "the stored scalar is nan"),
    "alpha 1e300": (lambda m: {**loha(kohya(Q), shape_of(m, Q)),
                               f"{kohya(Q)}.alpha": torch.tensor(1e300, dtype=torch.float64)},
                    AdapterFormatError, "beyond float32's range"),
    "nothing applies": (lambda m: loha("lora_unet_nowhere", (8, 8)), NothingToApplyError, "would change nothing"),
    "rank 0": (lambda m: {f"{kohya(Q)}.lokr_w1": torch.ones(4, 4), f"{kohya(Q)}.lokr_w2_a": torch.ones(8, 0),
                          f"{kohya(Q)}.lokr_w2_b": torch.ones(0, 8)}, AdapterFormatError, "rank 0"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_loader_node_refuses_hostile_files_untouched(loras, case):
    from lohakr.nodes.definitions import run_loader

    build, error, match = HOSTILE[case]
    model, clip = build_tiny_sdxl()
    name = save(loras, f"hostile_{case.replace(' ', '_')}.safetensors", build(model))
    before = state(model, clip)
    with pytest.raises(error, match=match) as raised:
        run_loader(model, name, 1.0, "", clip=clip, strength_clip=1.0)
    assert name in str(raised.value)
    assert not model.patches and not clip.patcher.patches
    after = state(model, clip)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_metadata_bomb_is_refused_by_node_and_route(loras):
    from lohakr.loaders.adapter import adapter_cache
    from lohakr.nodes.definitions import run_loader

    model, clip = build_tiny_sdxl()
    name = save(loras, "bomb.safetensors", loha(kohya(Q), shape_of(model, Q)),
                {**SDXL, "ss_network_args": "[" * 200_000 + "]" * 200_000})
    with pytest.raises(AdapterFormatError, match="bomb.safetensors: header field ss_network_args is JSON nested"):
        run_loader(model, name, 1.0, "", clip=clip)
    with pytest.raises(AdapterFormatError, match="nested deeper"):
        adapter_cache.load(loras / name)


@pytest.mark.parametrize("strength", [math.nan, math.inf])
def test_non_finite_strengths_are_refused(loras, strength):
    from lohakr.nodes.definitions import run_loader

    model, clip = build_tiny_sdxl()
    name = save(loras, "plain.safetensors", loha(kohya(Q), shape_of(model, Q)))
    with pytest.raises(LohakrError, match="a strength is a finite number"):
        run_loader(model, name, strength, "", clip=clip)
    assert not model.patches


def test_declared_base_model_mismatch_and_the_node_option(loras):
    from lohakr.nodes.definitions import run_loader

    model, clip = build_tiny_sdxl()
    name = save(loras, "sd15_says.safetensors", loha(kohya(Q), shape_of(model, Q)),
                {"ss_base_model_version": "sd_v1"})
    with pytest.raises(BaseModelMismatchError, match="sd15_says.safetensors: this is an SD1.5 adapter"):
        run_loader(model, name, 1.0, "", clip=clip)
    assert not model.patches
    (new_model, _), ui = run_loader(model, name, 1.0, "", clip=clip, allow_base_mismatch=True)
    report = json.loads(ui["lohakr_report"][0])[0]
    assert report["counts"] == {"applied": 1} and "allow_base_mismatch" in report["warnings"][0]
    assert len(new_model.patches) == 1


def test_a_layer_named_twice_is_patched_once(loras):
    import comfy.model_management as mm

    from lohakr.nodes.definitions import run_loader

    model, clip = build_tiny_sdxl()
    shape = shape_of(model, Q)
    diffusers_name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    once = save(loras, "once.safetensors", loha(kohya(Q), shape))
    twice = save(loras, "twice.safetensors", {**loha(kohya(Q), shape), **loha(diffusers_name, shape)})
    (m1, _), _ = run_loader(model, once, 1.0, "", clip=clip)
    (m2, _), ui = run_loader(model, twice, 1.0, "", clip=clip)
    report = json.loads(ui["lohakr_report"][0])[0]
    assert report["counts"] == {"applied": 1, "duplicate": 1}
    key = f"diffusion_model.{Q}.weight"
    mm.load_models_gpu([m1])
    single = m1.model.state_dict()[key].clone()
    m1.unpatch_model()
    mm.load_models_gpu([m2])
    assert torch.equal(m2.model.state_dict()[key], single)
    m2.unpatch_model()


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_patching_with_grad_enabled_on_weights_that_require_grad(loras, kind):
    """As a script or a training node would: patches computed outside inference mode."""
    import comfy.model_management as mm

    from lohakr import load_adapter
    from lohakr.nodes.definitions import run_loader

    model, clip = build_tiny_sdxl()
    model.model.requires_grad_(True)
    tensors = (lokr if kind == "lokr" else loha)(kohya(K), shape_of(model, K))
    name = save(loras, f"grad_{kind}.safetensors", tensors)
    key = f"diffusion_model.{K}.weight"
    original = model.model.state_dict()[key].detach().clone()
    (new_model, _), _ = run_loader(model, name, 0.7, "", clip=clip)
    with torch.enable_grad(), torch.inference_mode(False):
        mm.load_models_gpu([new_model])
    expected = load_adapter(loras / name).modules[kohya(K)].patched_weight(original, 0.7)
    assert torch.equal(new_model.model.state_dict()[key].detach(), expected)
    new_model.unpatch_model()


def test_the_lazy_patch_itself_refuses_to_write_non_finite_values(loras):
    """The second line of defence: a patch computed later by ComfyUI (another node's stack, a
    changed weight) that would overflow raises instead of returning NaN/inf."""
    from lohakr import load_adapter
    from lohakr.nodes.comfy_bridge import weight_adapter_class

    module = load_adapter(lokr("m", (32, 32), value=1e20)).modules["m"]
    patch = weight_adapter_class()(module, (32, 32), False, torch.float16)
    weight = torch.zeros(32, 32)
    with pytest.raises(NonFiniteUpdateError, match="patching x.weight at strength 1 would write NaN/inf"):
        patch.calculate_weight(weight, "x.weight", 1.0, 1.0, None, None)
    fine = load_adapter(lokr("m", (32, 32))).modules["m"]
    result = weight_adapter_class()(fine, (32, 32), False, torch.float16).calculate_weight(
        torch.zeros(32, 32), "x.weight", 1.0, 1.0, None, None)
    assert torch.isfinite(result).all() and result.abs().max() > 0
