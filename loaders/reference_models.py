"""Full-size SDXL and SD1.5 component configs, embedded (no downloads), built on any device.

Used to show how a file covers a real layout without weights (``meta`` device), and by the
benchmarks (materialised with random weights). Values are those of the published
stable-diffusion-xl-base-1.0 and stable-diffusion-v1-5 configs. Needs diffusers + transformers.
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
FAMILIES = ("sdxl", "sd1")


def build_components(family: str, device: str = "meta", dtype=None) -> dict[str, Any]:
    """UNet and text encoders of ``family`` (``sdxl`` or ``sd1``) with uninitialised weights."""
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
        if family == "sdxl":
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
        return ModelLayout.from_diffusers(**build_components(family, "meta"))
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
