"""Tiny SDXL- and SD1.5-structured diffusers models built from config (no downloads, seeded).

SDXL: 3 levels (DownBlock2D, 2×CrossAttn), Linear proj_in/out, text_time embedding, two CLIP
text encoders (CLIPTextModel, CLIPTextModelWithProjection). SD1.5: 4 levels, 1×1-conv proj_in/out.
The CLIP MLP width is 37, a prime, which gives LoKr its (1, n) edge case.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 0

# Tokenizer ids: see make_tokenizer(): 256 byte chars, 256 "</w>" chars,
# then <|startoftext|>=512, <|endoftext|>=513.
BOS_ID, EOS_ID = 512, 513
CLIP_COMMON = dict(
    vocab_size=1000,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=EOS_ID,
)
# CLIP-L-like (SD1.5 te, SDXL te1) and CLIP-G-like (SDXL te2, with projection)
TE1_CONFIG = dict(CLIP_COMMON, hidden_size=32, projection_dim=32)
TE2_CONFIG = dict(CLIP_COMMON, hidden_size=32, projection_dim=32, hidden_act="gelu")


def make_clip_text_model(cfg=TE1_CONFIG, seed=SEED):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def make_clip_text_model_with_projection(cfg=TE2_CONFIG, seed=SEED + 1):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()


def _bytes_to_unicode():
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(directory) -> Path:
    """Tiny byte-level CLIP vocab (514 tokens) + a header-only merges.txt."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = BOS_ID
    vocab["<|endoftext|>"] = EOS_ID
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return d


def make_tokenizer(directory, model_max_length=77):
    from transformers import CLIPTokenizer

    d = write_tokenizer_files(directory)
    tok = CLIPTokenizer.from_pretrained(str(d), model_max_length=model_max_length)
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    return tok


# --------------------------------------------------------------------------
# UNets / VAE / scheduler
# --------------------------------------------------------------------------
SDXL_ADD_TIME_DIM = 8
SDXL_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),  # = number of heads, as in real SDXL configs
    norm_num_groups=32,
    cross_attention_dim=TE1_CONFIG["hidden_size"] + TE2_CONFIG["hidden_size"],  # 64
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_ADD_TIME_DIM,
    # 6 time ids * addition_time_embed_dim + te2 projection_dim (pooled)
    projection_class_embeddings_input_dim=6 * SDXL_ADD_TIME_DIM
    + TE2_CONFIG["projection_dim"],  # 80
)

SD15_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=(
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    layers_per_block=2,
    attention_head_dim=8,
    norm_num_groups=32,
    cross_attention_dim=TE1_CONFIG["hidden_size"],  # 32
    use_linear_projection=False,  # proj_in / proj_out are 1x1 Conv2d
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=32,
)


def make_unet(cfg, seed=SEED):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg).eval()


def make_sdxl_unet(seed=SEED):
    return make_unet(SDXL_UNET_CONFIG, seed)


def make_sd15_unet(seed=SEED):
    return make_unet(SD15_UNET_CONFIG, seed)


def make_vae(seed=SEED):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG).eval()


def make_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="leading",
        steps_offset=1,
    )


def make_sdxl_pipeline(tok_dir, unet=None, te1=None, te2=None):
    from diffusers import StableDiffusionXLPipeline

    tok = make_tokenizer(tok_dir)
    return StableDiffusionXLPipeline(
        vae=make_vae(),
        text_encoder=te1 or make_clip_text_model(),
        text_encoder_2=te2 or make_clip_text_model_with_projection(),
        tokenizer=tok,
        tokenizer_2=tok,
        unet=unet or make_sdxl_unet(),
        scheduler=make_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def make_sd15_pipeline(tok_dir, unet=None, te=None):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=make_vae(),
        text_encoder=te or make_clip_text_model(),
        tokenizer=make_tokenizer(tok_dir),
        unet=unet or make_sd15_unet(),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )




# Diffusion transformers (docs/names-and-blocks.md#transformer-families): the real layouts, with a
# hidden size of 32 and two blocks of each kind. SD3's first block has the second attention of
# SD3.5 Medium; its last block is context_pre_only, as in every SD3.
TRANSFORMER_CONFIGS: dict[str, tuple[str, dict]] = {
    "flux1": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))),
    "chroma": ("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
        approximator_layers=2)),
    "flux2": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True)),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")),
    "zimage": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 4, 4], axes_lens=[64, 32, 32])),
    "qwenimage": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6))),
}


def make_transformer(family: str, seed=SEED, dtype=torch.float32):
    """A tiny diffusers transformer of ``family`` (a key of ``TRANSFORMER_CONFIGS``), seeded; every
    weight random (diffusers zero-initialises some output layers)."""
    import diffusers

    class_name, config = TRANSFORMER_CONFIGS[family]
    torch.manual_seed(seed)
    model = getattr(diffusers, class_name)(**config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model if dtype == torch.float32 else model.to(dtype)


def sgm_checkpoint_state(unet, text_encoder, text_encoder_2=None) -> dict:
    """A single-file checkpoint's state dict (original SGM keys, as A1111 and ComfyUI load it) from
    diffusers components: the UNet under ``model.diffusion_model.`` (``SgmNames``), CLIP-L under
    ``cond_stage_model.transformer.`` (SD1) or ``conditioner.embedders.0.transformer.`` (SDXL), and
    SDXL's bigG in OpenCLIP's layout (q/k/v fused into ``in_proj``, ``text_projection`` transposed).
    No VAE. For tests and benchmarks of single-file baking (docs/architecture.md#baking)."""
    from .names import SgmNames

    state = {}
    sgm = SgmNames(unet)
    for key, value in unet.state_dict().items():
        module, _, parameter = key.rpartition(".")
        state[f"model.diffusion_model.{sgm.to_sgm(module) or module}.{parameter}"] = value
    sdxl = text_encoder_2 is not None
    clip_prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, value in text_encoder.state_dict().items():
        state[clip_prefix + (key if key.startswith("text_model.") else "text_model." + key)] = value
    if text_encoder_2 is None:
        return state
    big = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    prefix = "conditioner.embedders.1.model."
    state[prefix + "token_embedding.weight"] = big["embeddings.token_embedding.weight"]
    state[prefix + "positional_embedding"] = big["embeddings.position_embedding.weight"]
    state[prefix + "ln_final.weight"], state[prefix + "ln_final.bias"] = big["final_layer_norm.weight"], big[
        "final_layer_norm.bias"]
    state[prefix + "text_projection"] = big["text_projection.weight"].t().contiguous()
    layers = len({k.split(".")[2] for k in big if k.startswith("encoder.layers.")})
    for n in range(layers):
        layer, block = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for what in ("weight", "bias"):
            state[f"{block}attn.in_proj_{what}"] = torch.cat(
                [big[f"{layer}self_attn.{p}_proj.{what}"] for p in ("q", "k", "v")])
            state[f"{block}attn.out_proj.{what}"] = big[f"{layer}self_attn.out_proj.{what}"]
            state[f"{block}ln_1.{what}"] = big[f"{layer}layer_norm1.{what}"]
            state[f"{block}ln_2.{what}"] = big[f"{layer}layer_norm2.{what}"]
            state[f"{block}mlp.c_fc.{what}"] = big[f"{layer}mlp.fc1.{what}"]
            state[f"{block}mlp.c_proj.{what}"] = big[f"{layer}mlp.fc2.{what}"]
    return {k: v.detach().contiguous() for k, v in state.items()}
