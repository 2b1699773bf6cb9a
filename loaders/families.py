"""The diffusion-transformer families as data: which diffusers class each is, its blocks, its text
encoders' key prefixes, and how its original (BFL / MMDiT / ComfyUI) layer names map onto diffusers'
layers, fused layers included (docs/names-and-blocks.md#transformer-families).

A new family is a new ``TransformerFamily`` entry: ``names.ModelLayout.from_transformer`` reads
these tables against the live module tree; nothing else changes.

``original`` maps an original layer name (relative to a scope such as ``double_blocks.{i}``) to the
diffusers layer(s) it is: one path, or a list of paths whose output rows it holds one after another
(BFL's fused ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k`` and ``to_v``), or ``SWAPPED_HALVES``
of a path (the final modulation: BFL orders it shift, scale; diffusers scale, shift).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SWAPPED_HALVES = "swapped halves"
# Swapped halves only where the layer has two halves (SD3's last joint block: its context
# modulation is 2H rows, every other block's 6H rows are in the same order on both sides).
SWAPPED_IF_TWO_HALVES = "swapped halves if it has 2·in rows"

Original = str | list[str] | tuple[str, str]  # one path | fused paths in row order | (path, SWAPPED_*)


@dataclass(frozen=True)
class BlockScope:
    """Numbered blocks: the diffusers prefix, the original prefix, the block name (``DOUBLE``) and the
    original names of the layers inside one block."""

    diffusers: str  # "transformer_blocks" (indices follow)
    original: str | None  # "double_blocks"; None where the original uses the diffusers names
    block: str  # "DOUBLE" → DOUBLE00, DOUBLE01…; "" for numbered layers that are not blocks (OTHER)
    layers: dict[str, Original] = field(default_factory=dict)


@dataclass(frozen=True)
class TransformerFamily:
    id: str
    name: str
    classes: tuple[str, ...]
    scopes: tuple[BlockScope, ...]
    top_level: dict[str, Original]
    # kohya-style key prefixes per text encoder component (``text_encoder_2``: T5 for Flux.1).
    text_encoders: dict[str, tuple[str, ...]]
    # substrings of ``modelspec.architecture`` / prefixes of ``ss_base_model_version`` naming it
    architectures: tuple[str, ...]
    # module names only this family's files have (base-model evidence)
    name_patterns: tuple[str, ...] = ()

    def block_of(self, path: str, original: bool = False) -> str:
        """``DOUBLE03`` for a layer in a numbered block, ``OTHER`` for embedders and heads; ``path``
        is a diffusers path, or with ``original`` the original one."""
        for scope in self.scopes:
            prefix = (scope.original or scope.diffusers) if original else scope.diffusers
            match = re.match(rf"{re.escape(prefix)}\.(\d+)\.", path)
            if match and scope.block:
                return f"{scope.block}{int(match.group(1)):02d}"
        return "OTHER"

    def text_encoder_block(self, component: str) -> str:
        """``TE`` for a family's only text encoder, else ``TE1``… by the encoder's place in the family."""
        if len(self.text_encoders) == 1:
            return "TE"
        return f"TE{list(self.text_encoders).index(component) + 1}"

    @property
    def block_groups(self) -> tuple[str, ...]:
        return tuple(scope.block for scope in self.scopes if scope.block)


_FLUX_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
_FLUX_TIME = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": ("norm_out.linear", SWAPPED_HALVES),
}

FLUX1 = TransformerFamily(
    id="flux1",
    name="Flux.1",
    classes=("FluxTransformer2DModel",),
    scopes=(
        BlockScope("transformer_blocks", "double_blocks", "DOUBLE", {
            **_FLUX_DOUBLE,
            "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
            "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
            "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
        }),
        BlockScope("single_transformer_blocks", "single_blocks", "SINGLE", {
            "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
            "linear2": "proj_out",
            "modulation.lin": "norm.linear",
        }),
    ),
    top_level={
        **_FLUX_TIME,
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    },
    text_encoders={"text_encoder": ("lora_te1_", "lora_te_"), "text_encoder_2": ("lora_te3_", "lora_te2_")},
    architectures=("flux-1", "flux1", "flux.1"),
    # Chroma shares every other Flux.1 name: only the per-block modulations tell them apart
    name_patterns=(r"(?:^|[._])(?:img|txt)_mod[._]lin", r"(?:^|[._])single_blocks[._]\d+[._]modulation",
                   r"(?:^|[._])single_transformer_blocks[._]\d+[._]norm[._]linear"),
)

CHROMA = TransformerFamily(
    id="chroma",
    name="Chroma",
    classes=("ChromaTransformer2DModel",),
    scopes=(
        BlockScope("transformer_blocks", "double_blocks", "DOUBLE", {
            **_FLUX_DOUBLE,
            "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
            "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
        }),
        BlockScope("single_transformer_blocks", "single_blocks", "SINGLE", {
            "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
            "linear2": "proj_out",
        }),
        # the modulation approximator's layers: embedders, not blocks
        BlockScope("distilled_guidance_layer.layers", "distilled_guidance_layer.layers", "", {
            "in_layer": "linear_1", "out_layer": "linear_2"}),
    ),
    top_level={"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
               "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
               "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj"},
    text_encoders={"text_encoder": ("lora_te_", "lora_te1_")},
    architectures=("chroma",),
    name_patterns=(r"distilled_guidance_layer",),
)

FLUX2 = TransformerFamily(
    id="flux2",
    name="Flux.2",
    classes=("Flux2Transformer2DModel",),
    scopes=(
        BlockScope("transformer_blocks", "double_blocks", "DOUBLE", {
            **_FLUX_DOUBLE,
            "img_mlp.0": "ff.linear_in", "img_mlp.2": "ff.linear_out",
            "txt_mlp.0": "ff_context.linear_in", "txt_mlp.2": "ff_context.linear_out",
        }),
        BlockScope("single_transformer_blocks", "single_blocks", "SINGLE", {
            "linear1": "attn.to_qkv_mlp_proj",
            "linear2": "attn.to_out",
        }),
    ),
    top_level={
        **_FLUX_TIME,
        "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
        "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
        "single_stream_modulation.lin": "single_stream_modulation.linear",
    },
    text_encoders={"text_encoder": ("lora_te_", "lora_te1_")},
    architectures=("flux-2", "flux2", "flux.2"),
    name_patterns=(r"to_qkv_mlp_proj", r"(?:double|single)_stream_modulation", r"ff(?:_context)?[._]linear_in"),
)

SD3 = TransformerFamily(
    id="sd3",
    name="SD3/SD3.5",
    classes=("SD3Transformer2DModel",),
    scopes=(
        BlockScope("transformer_blocks", "joint_blocks", "JOINT", {
            "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
            "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "x_block.attn.proj": "attn.to_out.0",
            "context_block.attn.proj": "attn.to_add_out",
            "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
            "x_block.attn2.proj": "attn2.to_out.0",
            "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
            "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
            "x_block.adaLN_modulation.1": "norm1.linear",
            "context_block.adaLN_modulation.1": ("norm1_context.linear", SWAPPED_IF_TWO_HALVES),
        }),
    ),
    top_level={
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": ("norm_out.linear", SWAPPED_HALVES),
    },
    text_encoders={"text_encoder": ("lora_te1_",), "text_encoder_2": ("lora_te2_",),
                   "text_encoder_3": ("lora_te3_",)},
    architectures=("stable-diffusion-3", "sd3"),
    name_patterns=(r"(?:^|[._])joint_blocks[._]\d+",),
)

_Z_BLOCK = {"attention.qkv": ["attention.to_q", "attention.to_k", "attention.to_v"],
            "attention.out": "attention.to_out.0"}
ZIMAGE = TransformerFamily(
    id="zimage",
    name="Z-Image",
    classes=("ZImageTransformer2DModel",),
    scopes=(
        BlockScope("layers", None, "LAYER", _Z_BLOCK),
        BlockScope("noise_refiner", None, "NREF", _Z_BLOCK),
        BlockScope("context_refiner", None, "CREF", _Z_BLOCK),
    ),
    top_level={
        "x_embedder": "all_x_embedder.2-1",
        "final_layer.linear": "all_final_layer.2-1.linear",
        "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1",
    },
    text_encoders={"text_encoder": ("lora_te_", "lora_te1_")},
    architectures=("z-image", "zimage", "z_image"),
    name_patterns=(r"(?:^|[._])(?:noise|context)_refiner[._]\d+", r"feed_forward[._]w[123]"),
)

QWEN_IMAGE = TransformerFamily(
    id="qwenimage",
    name="Qwen-Image",
    classes=("QwenImageTransformer2DModel",),
    scopes=(BlockScope("transformer_blocks", None, "LAYER"),),
    top_level={},
    text_encoders={"text_encoder": ("lora_te_", "lora_te1_")},
    architectures=("qwen-image", "qwen_image", "qwenimage"),
    name_patterns=(r"(?:img|txt)_mod[._]1(?:$|[._])", r"(?:img|txt)_mlp[._]net"),
)

FAMILIES: dict[str, TransformerFamily] = {f.id: f for f in (FLUX1, CHROMA, FLUX2, SD3, ZIMAGE, QWEN_IMAGE)}
FAMILY_OF_CLASS: dict[str, TransformerFamily] = {c: f for f in FAMILIES.values() for c in f.classes}


def family_of(transformer: object) -> TransformerFamily | None:
    """The family of a diffusers transformer, by its class (or a base class) name."""
    for cls in type(transformer).__mro__:
        family = FAMILY_OF_CLASS.get(cls.__name__)
        if family is not None:
            return family
    return None
