"""Real LyCORIS (PyPI ``lycoris-lora``) as the oracle: build networks on the tiny models, save real
files, and compute LyCORIS' own reference weights.

Reference semantics are the module ``forward`` (``get_weight`` applies alpha/rank once); never
``get_diff_weight``/``get_merged_weight``/``merge_to``, which apply it twice (docs/format.md#lycoris-double-scale).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")  # pin LyCORIS to its eager torch path

import torch  # noqa: E402

from lohakr.loaders import tiny_models  # noqa: E402

# name -> kwargs for lycoris.kohya.create_network
VARIANTS: dict[str, dict] = {
    "loha": dict(network_dim=4, network_alpha=2, algo="loha"),
    "loha_tucker": dict(network_dim=4, network_alpha=2, algo="loha", use_tucker=True),
    "loha_convdim": dict(network_dim=4, network_alpha=2, algo="loha", conv_dim=2, conv_alpha=1),
    "loha_dora_out": dict(network_dim=4, network_alpha=2, algo="loha", dora_wd=True, wd_on_output=True),
    "loha_dora_in": dict(network_dim=4, network_alpha=2, algo="loha", dora_wd=True, wd_on_output=False),
    "lokr": dict(network_dim=2, network_alpha=1, algo="lokr", factor=-1),
    "lokr_f4": dict(network_dim=2, network_alpha=1, algo="lokr", factor=4),
    "lokr_both": dict(network_dim=2, network_alpha=1, algo="lokr", factor=16, decompose_both=True),
    "lokr_full": dict(network_dim=10000, network_alpha=1, algo="lokr", factor=-1),
    "lokr_fullmatrix": dict(network_dim=4, network_alpha=1, algo="lokr", factor=4, full_matrix=True),
    "lokr_tucker": dict(network_dim=2, network_alpha=1, algo="lokr", factor=4, use_tucker=True),
    "lokr_convdim": dict(network_dim=2, network_alpha=1, algo="lokr", factor=4, conv_dim=1, conv_alpha=1),
    "lokr_dora_out": dict(network_dim=2, network_alpha=1, algo="lokr", factor=4, dora_wd=True),
    "lokr_dora_in": dict(network_dim=2, network_alpha=1, algo="lokr", factor=4, dora_wd=True,
                         wd_on_output=False),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _full_preset(directory: Path) -> str:
    """LyCORIS' "full" preset minus the ``time_embedding.linear_*`` names.

    lycoris-lora 4.1.3 lists both the class ``TimestepEmbedding`` and those names, so on a
    diffusers UNet it dies with "duplicated lora name"; the class match still targets them.
    """
    import toml
    from lycoris.config import FULL_TEXT_ENCODER_MODULES, FULL_UNET_MODULES

    path = directory / "lycoris_full_diffusers_preset.toml"
    if not path.exists():
        path.write_text(toml.dumps(dict(
            enable_conv=True,
            unet_target_module=list(FULL_UNET_MODULES),
            unet_target_name=["conv_in", "conv_out"],
            text_encoder_target_module=list(FULL_TEXT_ENCODER_MODULES),
            text_encoder_target_name=[],
        )))
    return str(path)


@dataclass
class TinyModels:
    family: str  # "sdxl" or "sd1"
    unet: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]  # component name -> model

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, **self.text_encoders}


def make_models(family: str) -> TinyModels:
    """Seeded tiny models: the same weights every call."""
    if family == "sdxl":
        return TinyModels("sdxl", tiny_models.make_sdxl_unet(), {
            "text_encoder": tiny_models.make_clip_text_model(),
            "text_encoder_2": tiny_models.make_clip_text_model_with_projection(),
        })
    return TinyModels("sd1", tiny_models.make_sd15_unet(), {"text_encoder": tiny_models.make_clip_text_model()})


def create_network(models: TinyModels, variant: str, workdir: Path):
    from lycoris.kohya import create_network as lycoris_create

    te = list(models.text_encoders.values())
    te_arg = te if len(te) > 1 else te[0]
    kw = dict(VARIANTS[variant])
    net = lycoris_create(1.0, kw.pop("network_dim"), kw.pop("network_alpha"), None, te_arg, models.unet,
                         preset=_full_preset(workdir), **kw)
    net.apply_to(te_arg, models.unet, apply_text_encoder=True, apply_unet=True)
    return net


@torch.no_grad()
def randomize(net, seed: int = 0, std: float = 0.1) -> None:
    """Fresh networks have a zero factor (ΔW = 0): fill every parameter; dora_scale is perturbed."""
    g = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("dora_scale"):
            p.mul_(1 + 0.1 * noise.to(p.dtype))
        else:
            p.copy_(noise * std)


@torch.no_grad()
def reference(net, multiplier: float = 1.0) -> dict[str, Reference]:
    """lora_name -> W0, LyCORIS' ΔW (scale included) and forward's patched weight W', fp32."""
    out = {}
    for m in net.text_encoder_loras + net.unet_loras:
        w0 = m.org_module[0].weight.detach().float().clone()
        diff = m.get_weight(m.shape).float() * m.scalar
        if m.wd:
            w = m.apply_weight_decompose(w0 + diff, multiplier)
        else:
            w = w0 + diff * multiplier
        out[m.lora_name] = Reference(w0, diff.reshape(w0.shape).clone(), w.float(), bool(m.wd))
    return out


@dataclass
class Reference:
    w0: torch.Tensor
    delta: torch.Tensor  # s·R: get_weight(shape) · scalar
    patched: torch.Tensor  # forward semantics at the multiplier
    dora: bool


@dataclass
class Fixture:
    family: str
    variant: str
    dtype: str
    path: Path
    models: TinyModels  # the models the reference was taken on (weights untouched)
    expected: dict[str, Reference]  # module name in the file -> reference
    network: object = None  # the LyCORIS network applied to ``models`` (set_multiplier to change μ)


def make_fixture(family: str, variant: str, dtype: str, workdir: Path, *, naming: str = "diffusers",
                 metadata: dict | None = None) -> Fixture:
    """Save a randomised LyCORIS network as a real file; reference from the *saved* factors.

    ``naming``: "diffusers" (what lycoris.kohya writes on a diffusers model), "kohya" (as real
    kohya files: ``text_model_`` in CLIP-L names, SGM UNet names on SDXL).
    """
    from safetensors.torch import load_file, save_file

    models = make_models(family)
    net = create_network(models, variant, workdir)
    randomize(net)
    raw = workdir / f"{family}_{variant}_{dtype}_raw.safetensors"
    net.save_weights(str(raw), DTYPES[dtype], {"ss_network_module": "lycoris.kohya",
                                               **(metadata or {})})
    # Reload the saved (rounded) factors into a fresh network on fresh seeded models.
    models = make_models(family)
    net = create_network(models, variant, workdir)
    missing = net.load_weights(str(raw))
    assert not missing, missing
    expected = reference(net)
    if naming == "diffusers":
        return Fixture(family, variant, dtype, raw, models, expected, net)
    renames = {name: kohya_name(name, family) for name in expected}
    from safetensors import safe_open

    with safe_open(str(raw), "pt") as f:
        header = f.metadata()
    tensors = load_file(str(raw))
    renamed = {}
    for key, value in tensors.items():
        module, _, suffix = key.partition(".")
        renamed[f"{renames.get(module, module)}.{suffix}"] = value
    path = workdir / f"{family}_{variant}_{dtype}_kohya.safetensors"
    save_file(renamed, str(path), header)
    return Fixture(family, variant, dtype, path, models,
                   {renames[k]: v for k, v in expected.items()}, net)


def kohya_name(name: str, family: str) -> str:
    """What a real kohya file calls a module LyCORIS named on a transformers-5 diffusers model."""
    name = re.sub(r"^(lora_te1?|lora_te2)_(encoder_)", r"\1_text_model_\2", name)
    if family == "sdxl" and name.startswith("lora_unet_"):
        from lycoris.utils import convert_diffusers_name_to_compvis

        body = name[len("lora_unet_"):]
        body = {"add_embedding_linear_1": "label_emb_0_0", "add_embedding_linear_2": "label_emb_0_2"}.get(body, body)
        name = convert_diffusers_name_to_compvis("lora_unet_" + body)
    return name


# -- diffusion transformers (docs/names-and-blocks.md#transformer-families) ------------------------
def lycoris_on(model: torch.nn.Module, variant: str, seed: int = 0):
    """LyCORIS' own ``create_lycoris`` on every Linear of ``model`` (as SimpleTuner applies it:
    ``lycoris_<path>`` names), randomised; the preset is put back afterwards."""
    from lycoris import LycorisNetwork, create_lycoris

    kw = dict(VARIANTS[variant])
    saved = {k: getattr(LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV")}
    LycorisNetwork.apply_preset({"target_module": ["Linear"], "target_name": [], "enable_conv": False})
    try:
        net = create_lycoris(model, 1.0, linear_dim=kw.pop("network_dim"), linear_alpha=kw.pop("network_alpha"),
                             **kw)
    finally:
        for key, value in saved.items():
            setattr(LycorisNetwork, key, value)
    net.apply_to()
    randomize(net, seed)
    return net


@torch.no_grad()
def module_reference(net, multiplier: float = 1.0) -> dict[str, Reference]:
    """``reference`` for a ``create_lycoris`` network: lora_name → W0, ΔW and W' (forward semantics)."""
    out = {}
    for m in net.loras:
        w0 = m.org_module[0].weight.detach().float().clone()
        diff = m.get_weight(m.shape).float() * m.scalar
        w = m.apply_weight_decompose(w0 + diff, multiplier) if m.wd else w0 + diff * multiplier
        out[m.lora_name] = Reference(w0, diff.reshape(w0.shape).clone(), w.float(), bool(m.wd))
    return out


def save_lycoris(net, path: Path, renames=None, metadata: dict | None = None) -> Path:
    """Save ``net``'s factors (float32) with module names passed through ``renames``."""
    from safetensors.torch import save_file

    tensors = {}
    for m in net.loras:
        name = renames(m.lora_name) if renames else m.lora_name
        for key, value in m.state_dict().items():
            if key.startswith("org_") or key == "scalar":
                continue
            tensors[f"{name}.{key}"] = value.detach().float().contiguous()
    save_file(tensors, str(path), metadata or {})
    return path
