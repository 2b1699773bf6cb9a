"""Real ComfyUI for tests: found through ``COMFYUI_DIR``; tests skip with a clear message without it.

Builds a tiny SDXL-structured MODEL and CLIP with ComfyUI's own classes (seeded), and their
diffusers/transformers twins with the same weights (copied layer by layer through our SGM map),
so that the diffusers side can patch the same weights from the same file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
SKIP_REASON = ("COMFYUI_DIR is not set: these tests need a ComfyUI source tree (git clone ComfyUI, install its "
               "requirements, then COMFYUI_DIR=/path/to/ComfyUI python -m pytest)")

UNET_CONFIG = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
               "legacy": False, "num_classes": "sequential", "adm_in_channels": 32 + 6 * 256, "in_channels": 4,
               "model_channels": 32, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
               "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
               "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "use_linear_in_transformer": True,
               "context_dim": 64, "use_temporal_attention": False, "use_temporal_resblock": False}
CLIP_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 32}


def require_comfyui() -> Path:
    if not COMFYUI_DIR:
        pytest.skip(SKIP_REASON, allow_module_level=True)
    path = Path(COMFYUI_DIR)
    if not (path / "comfy").is_dir():
        pytest.skip(f"COMFYUI_DIR={COMFYUI_DIR} has no comfy/ package", allow_module_level=True)
    return path


def import_comfy(loras_dir: Path | None = None):
    """Import ComfyUI in this process on the CPU; register ``loras_dir`` as a loras folder."""
    path = require_comfyui()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401
    import folder_paths

    if loras_dir is not None:
        folder_paths.add_model_folder_path("loras", str(loras_dir), is_default=True)
    return folder_paths


def build_tiny_sdxl(seed: int = 0):
    """A tiny SDXL ModelPatcher and CLIP built with ComfyUI's own classes, seeded random weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base

    g = torch.Generator().manual_seed(seed)
    config = comfy.supported_models.SDXL(dict(UNET_CONFIG))
    config.unet_config["num_head_channels"] = 16  # the base class resets it to 64
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "model.", device=torch.device("cpu"))
    clip = comfy.sd.CLIP(
        comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
        model_options={"clip_l_model_config": dict(CLIP_CONFIG), "clip_g_model_config": dict(CLIP_CONFIG),
                       "dtype": torch.float32},
    )
    with torch.no_grad():
        for p in list(model.parameters()) + list(clip.cond_stage_model.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.requires_grad_(False)  # as ComfyUI's checkpoint loaders leave it
    clip.cond_stage_model.requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, clip


def diffusers_twin(unet_state: dict[str, torch.Tensor], clip_state: dict[str, torch.Tensor]):
    """diffusers UNet + transformers CLIPs with the same layer weights as the ComfyUI tiny model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lohakr.loaders.names import SgmNames, patchable_layers

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 128), layers_per_block=2, transformer_layers_per_block=(1, 1, 1),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 8),
        cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=32 + 6 * 256, norm_num_groups=32,
        in_channels=4, out_channels=4, sample_size=32)
    config = CLIPTextConfig(**CLIP_CONFIG, hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
    te1, te2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    sgm = SgmNames(unet)
    with torch.no_grad():
        for path, layer in patchable_layers(unet):
            layer.weight.copy_(unet_state[f"diffusion_model.{sgm.to_sgm(path)}.weight"])
        for prefix, model in (("clip_l", te1), ("clip_g", te2)):
            for path, layer in patchable_layers(model):
                inner = path if path.startswith("text_model.") or path == "text_projection" else "text_model." + path
                layer.weight.copy_(clip_state[f"{prefix}.transformer.{inner}.weight"])
    return unet, te1, te2


def comfy_key(target, sgm) -> str:
    """The ComfyUI state-dict key (CLIP keys prefixed ``clip:``) of a diffusers-layout target."""
    if target.component == "unet":
        return f"diffusion_model.{sgm.to_sgm(target.path)}.weight"
    prefix = "clip_l" if target.component == "text_encoder" else "clip_g"
    inner = target.path if target.path.startswith(("text_model.", "text_projection")) else "text_model." + target.path
    return f"clip:{prefix}.transformer.{inner}.weight"
