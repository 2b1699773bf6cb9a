"""Full-size SDXL, SD1.5 and transformer (Flux.1, Chroma, Flux.2, SD3.5, Z-Image, Qwen-Image) configs, embedded
(no downloads), built on any device.

Used to show how a file covers a real layout without weights (``meta`` device), and by the
benchmarks (materialised with random weights). Values are those of the published
stable-diffusion-xl-base-1.0, stable-diffusion-v1-5, FLUX.1-dev, Chroma1-HD, FLUX.2-dev, stable-diffusion-3.5-large,
Z-Image-Turbo and Qwen-Image configs (transformers; CLIP and T5 encoders where pipelines have
them, not the language-model encoders of Flux.2, Z-Image and Qwen-Image). Needs diffusers + transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .names import ModelLayout

SDXL_UNET: dict[str, Any] = {
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SD15_UNET: dict[str, Any] = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
CLIP_L: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408,
}
CLIP_BIGG: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408,
}
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "feed_forward_proj": "gated-gelu", "is_gated_act": True, "dense_act_fn": "gelu_new",
}
TRANSFORMERS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux1": ("FluxTransformer2DModel", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}),
    "chroma": ("ChromaTransformer2DModel", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "axes_dims_rope": (16, 56, 56),
        "approximator_num_channels": 64, "approximator_hidden_dim": 5120, "approximator_layers": 5}),
    "flux2": ("Flux2Transformer2DModel", {
        "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128,
        "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256,
        "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "guidance_embeds": True}),
    "sd3": ("SD3Transformer2DModel", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
        "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
        "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"}),
    "zimage": ("ZImageTransformer2DModel", {
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
        "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "cap_feat_dim": 2560, "axes_dims": [32, 48, 48],
        "axes_lens": [1024, 512, 512]}),
    "qwenimage": ("QwenImageTransformer2DModel", {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
        "axes_dims_rope": (16, 56, 56)}),
}
# text encoders of the transformer pipelines: component → (class, config)
TRANSFORMER_TEXT_ENCODERS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "flux1": {"text_encoder": ("CLIPTextModel", CLIP_L), "text_encoder_2": ("T5EncoderModel", T5_XXL)},
    "chroma": {"text_encoder": ("T5EncoderModel", T5_XXL)},
    "sd3": {"text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
            "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_BIGG),
            "text_encoder_3": ("T5EncoderModel", T5_XXL)},
}
FAMILIES = ("sdxl", "sd1", *TRANSFORMERS)


def build_components(family: str, device: str = "meta", dtype=None) -> dict[str, Any]:
    """UNet or transformer and text encoders of ``family`` (a key of ``FAMILIES``) with uninitialised weights."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    import torch

    try:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "showing a model layout needs diffusers and transformers: pip install 'lohakr[diffusers]'"
        ) from err
    with torch.device(device):
        if family in TRANSFORMERS:
            import diffusers
            import transformers

            class_name, config = TRANSFORMERS[family]
            parts = {"transformer": getattr(diffusers, class_name)(**config)}
            for component, (encoder, encoder_config) in TRANSFORMER_TEXT_ENCODERS.get(family, {}).items():
                config_class = transformers.T5Config if encoder.startswith("T5") else CLIPTextConfig
                parts[component] = getattr(transformers, encoder)(config_class(**encoder_config))
        elif family == "sdxl":
            parts = {
                "unet": UNet2DConditionModel(**SDXL_UNET),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
            }
        else:
            parts = {
                "unet": UNet2DConditionModel(**SD15_UNET),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            }
    if dtype is not None:
        for part in parts.values():
            part.to(dtype)
    return parts


TABLES = Path(__file__).with_name("layouts")


def reference_layout(family: str, *, from_model: bool = False) -> ModelLayout:
    """The layout of the full-size model: from its table in ``layouts/`` (no torch, no diffusers;
    milliseconds), or with ``from_model`` built from the model on the meta device (no memory, no
    weights; the tables are written from this, and a test keeps them equal)."""
    if from_model:
        parts = build_components(family, "meta")
        transformer = parts.pop("transformer", None)
        if transformer is not None:
            from .families import FAMILIES as TRANSFORMER_FAMILIES

            return ModelLayout.from_transformer(transformer, TRANSFORMER_FAMILIES[family], parts)
        return ModelLayout.from_diffusers(**parts)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    return ModelLayout.from_table(json.loads((TABLES / f"{family}.json").read_text(encoding="utf-8")))


def write_layout_tables() -> None:
    """Write ``layouts/<family>.json`` from the models (run after changing the configs above)."""
    TABLES.mkdir(exist_ok=True)
    for family in FAMILIES:
        table = reference_layout(family, from_model=True).to_table()
        (TABLES / f"{family}.json").write_text(json.dumps(table, separators=(",", ":")) + "\n", encoding="utf-8")


if __name__ == "__main__":  # python -m lohakr.loaders.reference_models
    write_layout_tables()
