"""Diffusion transformers (Flux.1, Flux.2, SD3, Z-Image, Qwen-Image) in diffusers: real LyCORIS files
in every naming style, fused original names on diffusers' split layers, blocks and base-model
refusal (docs/names-and-blocks.md#transformer-families, #fused-and-split-layers)."""

from __future__ import annotations

import pytest
import torch
from lycoris_oracle import lycoris_on, module_reference, save_lycoris
from test_diffusers import assert_patched, max_rel

import lohakr
from lohakr import BaseModelMismatchError, LohakrError, load_adapter
from lohakr.loaders import tiny_models
from lohakr.loaders.diffusers_pipeline import pipeline_layout
from lohakr.loaders.families import FAMILIES
from lohakr.loaders.names import ModelLayout, patchable_layers

FAMILY_IDS = list(tiny_models.TRANSFORMER_CONFIGS)
PIPELINES = {"flux1": "FluxPipeline", "chroma": "ChromaPipeline", "flux2": "Flux2Pipeline",
             "sd3": "StableDiffusion3Pipeline", "zimage": "ZImagePipeline", "qwenimage": "QwenImagePipeline"}
VARIANTS = ["loha", "loha_dora_out", "lokr", "lokr_f4", "lokr_both", "lokr_full", "lokr_dora_out"]


def make_pipe(family: str, with_text_encoder: bool = False):
    """The stock diffusers pipeline of ``family`` around a tiny transformer (and, for Flux.1, a tiny
    CLIP-L); the other components are left out, as nothing here runs them."""
    import diffusers

    cls = getattr(diffusers, PIPELINES[family])
    names = set(cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount])
    parts = {name: None for name in names}
    parts["transformer"] = tiny_models.make_transformer(family)
    if with_text_encoder:
        parts["text_encoder"] = tiny_models.make_clip_text_model()
    pipe = cls(**parts)
    return lohakr.enable(pipe)


def weights(pipe):
    layout = pipeline_layout(pipe)
    return layout, {key: t.layer.weight.detach().clone() for key, t in layout.targets.items()}


@pytest.mark.parametrize("family", FAMILY_IDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lycoris_files_apply_as_lycoris_does(tmp_path, family, variant):
    """SimpleTuner / LyCORIS ``lycoris_<path>`` files made by LyCORIS on the diffusers transformer."""
    pipe = make_pipe(family)
    net = lycoris_on(tiny_models.make_transformer(family), variant)
    expected = module_reference(net)
    path = save_lycoris(net, tmp_path / f"{family}_{variant}.safetensors")
    strength = 0.7
    report = pipe.load_lycoris(path, strength=strength)
    assert report.complete and len(report.applied) == len(expected), report.format()
    assert report.model_family == family
    layout = pipeline_layout(pipe)
    for outcome in report.applied:
        ref = expected[outcome.module]
        got = layout.targets[outcome.target].layer.weight.detach()
        if ref.dora:
            wanted = ref.w0 + strength * (ref.patched - ref.w0)
            assert max_rel(got, wanted, wanted) <= 1e-5, outcome.module
        else:
            assert_patched(got, ref.w0, strength * ref.delta, outcome.module)
    pipe.unload_lycoris()
    _, after = weights(pipe)
    fresh = dict(patchable_layers(tiny_models.make_transformer(family)))
    for key, value in after.items():
        assert torch.equal(value, fresh[key.removeprefix("transformer.")].weight), key


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model.", "", "lora_transformer_"])
def test_every_diffusers_naming_style(tmp_path, prefix):
    pipe = make_pipe("flux1")
    net = lycoris_on(tiny_models.make_transformer("flux1"), "lokr")

    def rename(name: str) -> str:
        path = next(p for p, _ in patchable_layers(pipe.transformer) if "lycoris_" + p.replace(".", "_") == name)
        return prefix + (path.replace(".", "_") if prefix.endswith("_") else path)

    path = save_lycoris(net, tmp_path / "named.safetensors", rename)
    report = pipe.load_lokr(path)
    assert report.complete and len(report.applied) == len(net.loras), report.format()


def original_model(family: str, transformer: torch.nn.Module) -> tuple[torch.nn.Module, dict]:
    """The family's original (BFL / MMDiT / ComfyUI) layer tree, built from the family table: each
    original layer a Linear holding its diffusers layers' rows (fused, or halves swapped). Returns
    the tree and, per original path, its parts (docs/names-and-blocks.md#fused-and-split-layers)."""
    from lohakr.loaders.names import _original_names

    layout = ModelLayout.from_transformer(transformer, FAMILIES[family])
    paths = [path + "." for path, _ in patchable_layers(transformer)]
    root, parts_of = torch.nn.Module(), {}
    for original, _ in _original_names(FAMILIES[family], paths):
        parts = layout.resolve_parts(original)
        if parts is None or (len(parts) == 1 and parts[0].rows is None and original == parts[0].target.path):
            continue
        if parts[0].target.layer.weight.dim() != 2:  # SD3's patch embedding is a conv: not fused anywhere
            continue
        rows = [part.target.layer.weight[slice(*(part.rows or (0, part.height)))] for part in parts]
        fused = torch.cat([r.detach() for r in rows])
        linear = torch.nn.Linear(fused.shape[1], fused.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(fused)
        holder = root
        *outer, leaf = original.split(".")
        for name in outer:
            if not hasattr(holder, name):
                holder.add_module(name, torch.nn.Module())
            holder = getattr(holder, name)
        holder.add_module(leaf, linear)
        parts_of[original] = parts
    return root, parts_of


@pytest.mark.parametrize("family", ["flux1", "chroma", "flux2", "sd3", "zimage"])
@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr_f4", "lokr_full", "lokr_dora_out", "loha_dora_out"])
@pytest.mark.parametrize("style", ["lora_unet_", "diffusion_model."])
def test_original_fused_names_on_split_diffusers_layers(tmp_path, family, variant, style):
    """kohya (``lora_unet_``) and ai-toolkit (``diffusion_model.``) files name the original fused
    layers; each diffusers layer gets its rows of the fused update, halves swapped where the
    schemes order them differently: the weights LyCORIS gives the fused layer, row for row."""
    pipe = make_pipe(family)
    tree, parts_of = original_model(family, tiny_models.make_transformer(family))
    net = lycoris_on(tree, variant)
    expected = module_reference(net)
    by_name = {"lycoris_" + p.replace(".", "_"): p for p in parts_of}

    def rename(name: str) -> str:
        original = by_name[name]
        return "lora_unet_" + original.replace(".", "_") if style == "lora_unet_" else style + original

    path = save_lycoris(net, tmp_path / "original.safetensors", rename)
    strength = 0.6
    report = pipe.load_lycoris(path, strength=strength)
    assert report.complete and len(report.applied) == len(parts_of), report.format()
    _, got = weights(pipe)
    checked = 0
    for name, ref in expected.items():
        parts = parts_of[by_name[name]]
        wanted = ref.w0 + strength * (ref.patched - ref.w0) if ref.dora else ref.w0 + strength * ref.delta
        row = 0
        for part in parts:
            rows = slice(*(part.rows or (0, part.height)))
            piece = got[part.target.key][rows]
            expect = wanted[row:row + part.height]
            if ref.dora:
                assert max_rel(piece, expect, expect) <= 1e-5, (name, part)
            else:
                assert_patched(piece, ref.w0[row:row + part.height], expect - ref.w0[row:row + part.height], name)
            row += part.height
            checked += 1
    assert checked > len(expected)  # fused layers were split


def test_input_axis_dora_on_a_fused_layer_is_refused_with_the_reason(tmp_path):
    pipe = make_pipe("flux1")
    tree, parts_of = original_model("flux1", tiny_models.make_transformer("flux1"))
    net = lycoris_on(tree, "lokr_dora_in")
    by_name = {"lycoris_" + p.replace(".", "_"): p for p in parts_of}
    path = save_lycoris(net, tmp_path / "dora_in.safetensors",
                        lambda name: "lora_unet_" + by_name[name].replace(".", "_"))
    report = pipe.load_lokr(path)
    refused = report.of("unsupported")
    assert refused and all("input axis" in o.reason for o in refused), report.format()
    split = {"lora_unet_" + p.replace(".", "_") for p in parts_of  # over several layers: not the swapped halves
             if len({part.target.key for part in parts_of[p]}) > 1}
    assert {o.module for o in refused} == split
    assert "lora_unet_final_layer_adaLN_modulation_1" in {o.module for o in report.applied}
    # the swapped halves are one layer in another row order: its column norms, and so its DoRA, are LyCORIS'
    ref = module_reference(net)["lycoris_final_layer_adaLN_modulation_1"]
    got = pipe.transformer.norm_out.linear.weight.detach()
    half = got.shape[0] // 2
    assert max_rel(torch.cat([got[half:], got[:half]]), ref.patched, ref.patched) <= 1e-5
    with pytest.raises(LohakrError):
        make_pipe("flux1").load_lokr(path, strict=True)


def _original_state_dict(family: str, transformer) -> dict:
    """The model's weights and biases under the family table's original names (identity where the
    table is silent), a dict whose missing keys read as a dummy: what a single-file checkpoint holds."""
    layout = ModelLayout.from_transformer(transformer, FAMILIES[family])

    class Checkpoint(dict):
        def pop(self, key, *default):
            return super().pop(key) if key in self else torch.zeros(1)

        def __getitem__(self, key):
            return super().__getitem__(key) if key in self else torch.zeros(1)

    from lohakr.loaders.names import _original_names

    checkpoint = Checkpoint()
    covered = set()
    paths = [path + "." for path, _ in patchable_layers(transformer)]
    for original, _ in _original_names(FAMILIES[family], paths):
        parts = layout.resolve_parts(original)
        if parts is None:
            continue
        for what in ("weight", "bias"):
            tensors = [getattr(part.target.layer, what) for part in parts]
            if any(t is None for t in tensors):
                continue
            checkpoint[f"{original}.{what}"] = torch.cat([t.detach()[slice(*(p.rows or (0, p.height)))]
                                                          for t, p in zip(tensors, parts, strict=True)])
        covered |= {part.target.path for part in parts}
    for path, layer in patchable_layers(transformer):
        if path not in covered:
            for what in ("weight", "bias"):
                if getattr(layer, what, None) is not None:
                    checkpoint[f"{path}.{what}"] = getattr(layer, what).detach()
    return checkpoint


@pytest.mark.parametrize("family, converter", [  # Flux.1's and Chroma's converters hardcode full-size widths
    ("flux2", "convert_flux2_transformer_checkpoint_to_diffusers"),
    ("sd3", "convert_sd3_transformer_checkpoint_to_diffusers"),
    ("zimage", "convert_z_image_transformer_checkpoint_to_diffusers"),
])
def test_family_tables_agree_with_diffusers_single_file_converters(family, converter):
    """The original names of our tables, fed to diffusers' own single-file converter, give back
    every Linear weight and bias of the diffusers model (fused layers split, halves swapped)."""
    from diffusers.loaders import single_file_utils

    transformer = tiny_models.make_transformer(family)
    converted = getattr(single_file_utils, converter)(_original_state_dict(family, transformer))
    checked = 0
    for path, layer in patchable_layers(transformer):
        for what in ("weight", "bias"):
            value = getattr(layer, what, None)
            if value is not None:
                assert torch.equal(converted[f"{path}.{what}"], value.detach()), f"{path}.{what}"
                checked += 1
    assert checked >= 30


@pytest.mark.parametrize("family, blocks", [
    ("flux1", ["TE1", "DOUBLE00", "DOUBLE01", "SINGLE00", "SINGLE01", "OTHER"]),
    ("flux2", ["DOUBLE00", "DOUBLE01", "SINGLE00", "SINGLE01", "OTHER"]),
    ("chroma", ["DOUBLE00", "DOUBLE01", "SINGLE00", "SINGLE01", "OTHER"]),
    ("sd3", ["JOINT00", "JOINT01", "OTHER"]),
    ("zimage", ["LAYER00", "LAYER01", "NREF00", "CREF00", "OTHER"]),
    ("qwenimage", ["LAYER00", "LAYER01", "OTHER"]),
])
def test_blocks_of_each_family(family, blocks):
    assert pipeline_layout(make_pipe(family, with_text_encoder=family == "flux1")).blocks == blocks


@pytest.mark.parametrize("spec", ["DOUBLE=0, SINGLE01=0", "1, 0, 0, 1, 0"])
def test_block_weights_on_a_transformer(tmp_path, spec):
    """Named values, or a vector (BASE, the double blocks, the single blocks: the Inspire pack's order)."""
    pipe = make_pipe("flux1")
    net = lycoris_on(tiny_models.make_transformer("flux1"), "lokr")
    path = save_lycoris(net, tmp_path / "blocks.safetensors")
    _, before = weights(pipe)
    pipe.load_lokr(path, block_weights=spec)
    layout, after = weights(pipe)
    changed = {layout.targets[k].block for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"SINGLE00", "OTHER"}


def test_a_flux_file_is_refused_on_sd3_and_on_sdxl(tmp_path):
    net = lycoris_on(tiny_models.make_transformer("flux1"), "lokr")
    path = save_lycoris(net, tmp_path / "flux.safetensors", lambda n: n,
                        {"modelspec.architecture": "flux-1-dev/lora"})
    sd3 = make_pipe("sd3")
    _, before = weights(sd3)
    with pytest.raises(BaseModelMismatchError, match=r"Flux\.1.*SD3"):
        sd3.load_lokr(path)
    assert all(torch.equal(before[k], v) for k, v in weights(sd3)[1].items())
    sdxl = lohakr.enable(tiny_models.make_sdxl_pipeline(tmp_path / "tok"))
    with pytest.raises(BaseModelMismatchError, match=r"Flux\.1.*SDXL"):
        sdxl.load_lokr(path)


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
                                   feed_forward_proj="gated-gelu")).eval()


@pytest.mark.parametrize("t5_prefix", ["lora_te3_", "lora_te2_"])
def test_kohya_flux_file_with_both_text_encoders(tmp_path, t5_prefix):
    """sd-scripts Flux.1 files: ``lora_unet_<BFL>``, ``lora_te1_`` for CLIP-L (not SDXL evidence) and
    ``lora_te3_`` for T5 (OneTrainer: ``lora_te2_``)."""
    from safetensors.torch import load_file, save_file

    pipe = make_pipe("flux1", with_text_encoder=True)
    pipe.text_encoder_2 = tiny_t5()
    clip = lycoris_on(tiny_models.make_clip_text_model(), "loha")
    t5 = lycoris_on(tiny_t5(), "loha")
    tree, _ = original_model("flux1", tiny_models.make_transformer("flux1"))
    net = lycoris_on(tree, "loha")
    files = [save_lycoris(clip, tmp_path / "te1.safetensors", lambda n: n.replace("lycoris_", "lora_te1_")),
             save_lycoris(t5, tmp_path / "te2.safetensors", lambda n: n.replace("lycoris_", t5_prefix)),
             save_lycoris(net, tmp_path / "unet.safetensors", lambda n: n.replace("lycoris_", "lora_unet_"))]
    both = tmp_path / "kohya_flux.safetensors"
    save_file({k: v for f in files for k, v in load_file(f).items()}, str(both))
    _, before = weights(pipe)
    report = pipe.load_loha(both, text_encoder_strength=0.5)
    assert report.complete, report.format()
    assert report.model_family == "flux1" and load_adapter(both).base_model == "flux1"
    assert {o.block for o in report.applied} >= {"TE1", "TE2", "DOUBLE00", "SINGLE01", "OTHER"}
    layout, after = weights(pipe)
    t5_changed = [k for k in after if k.startswith("text_encoder_2.") and not torch.equal(before[k], after[k])]
    assert len(t5_changed) == len(t5.loras)


def test_unknown_transformer_is_named():
    class Other(torch.nn.Module):
        pass

    pipe = type("Pipe", (), {})()
    pipe.transformer = Other()
    with pytest.raises(LohakrError, match="Other.*Flux.1"):
        pipeline_layout(pipe)


@pytest.mark.parametrize("family", ["flux1", "sd3", "qwenimage"])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_peft_folders_patch_what_peft_merges(tmp_path, family, kind):
    """PEFT ``save_pretrained`` folders (``base_model.model.<path>`` + adapter_config.json)."""
    import copy

    from peft import LoHaConfig, LoKrConfig, get_peft_model

    pipe = make_pipe(family)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = (LoHaConfig if kind == "loha" else LoKrConfig)(r=4, alpha=8, target_modules=[
        "to_q", "to_k", "to_v", "add_q_proj", "to_out.0", "proj_mlp", "linear"])
    model = get_peft_model(copy.deepcopy(pipe.transformer), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".hada_" in name or ".lokr_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(tmp_path / "peft")
    merged = model.merge_and_unload().state_dict()
    report = pipe.load_lycoris(tmp_path / "peft")
    assert report.complete and report.applied, report.format()
    got = pipe.transformer.state_dict()
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert len(changed) == len(report.applied)
    for key in changed:
        assert_patched(got[key], base[key], merged[key] - base[key], key)


def test_info_shows_a_full_size_flux_file_on_the_flux_layout(tmp_path, capsys):
    """``lohakr info`` on a kohya Flux.1 LoKr with full-size shapes: detected as Flux.1, every module
    (fused qkv and linear1, the swapped final modulation, CLIP-L) covers the reference layout."""
    import json

    from safetensors.torch import save_file

    from lohakr.loaders.cli import main

    g = torch.Generator().manual_seed(0)

    def lokr(name, rows, cols, factor=16):
        return {f"{name}.lokr_w1": torch.randn(factor, factor, generator=g),
                f"{name}.lokr_w2_a": torch.randn(rows // factor, 4, generator=g),
                f"{name}.lokr_w2_b": torch.randn(4, cols // factor, generator=g), f"{name}.alpha": torch.tensor(2.0)}

    tensors = {**lokr("lora_unet_double_blocks_0_img_attn_qkv", 9216, 3072),
               **lokr("lora_unet_single_blocks_37_linear1", 21504, 3072),
               **lokr("lora_unet_final_layer_adaLN_modulation_1", 6144, 3072),
               **lokr("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)}
    path = tmp_path / "flux_full.safetensors"
    save_file(tensors, str(path), {"ss_base_model_version": "flux1"})
    assert main(["info", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapter"]["base_model"] == "flux1"
    coverage = data["coverage"]
    assert coverage["model_family"] == "flux1" and coverage["counts"] == {"applied": 4}
    assert {o["block"] for o in coverage["outcomes"]} == {"DOUBLE00", "SINGLE37", "OTHER", "TE1"}
    qkv = next(o for o in coverage["outcomes"] if o["module"].endswith("qkv"))
    assert qkv["target"] == ("transformer.transformer_blocks.0.attn.to_q + transformer.transformer_blocks.0.attn.to_k"
                             " + transformer.transformer_blocks.0.attn.to_v")


@pytest.mark.parametrize("origin", ["memory", "mapped"])
def test_strength_batch_and_unload_on_a_saved_flux_pipeline(tmp_path, origin):
    """Every call on a stock pipeline: strength changes recompute from the kept factors, a batch is
    one pass, unload is bit-exact; a pipeline read back with ``from_pretrained`` keeps its originals
    in the mapped files (docs/architecture.md#originals-in-files)."""
    import diffusers

    pipe = make_pipe("flux1")
    if origin == "mapped":
        pipe.transformer.save_pretrained(tmp_path / "transformer")
        transformer = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
        parts = {**{k: None for k in pipe.components}, "transformer": transformer}
        pipe = lohakr.enable(diffusers.FluxPipeline(**parts))
    _, before = weights(pipe)
    tree, _ = original_model("flux1", tiny_models.make_transformer("flux1"))
    kohya = save_lycoris(lycoris_on(tree, "lokr_f4"), tmp_path / "k.safetensors",
                         lambda n: n.replace("lycoris_", "lora_unet_"))
    simple = save_lycoris(lycoris_on(tiny_models.make_transformer("flux1"), "loha", seed=1),
                          tmp_path / "s.safetensors")
    with pipe.lycoris_batch():
        pipe.load_lokr(kohya, "k", strength=0.5)
        report = pipe.load_loha(simple, "s", strength={"transformer": 0.7})
    if origin == "mapped":
        assert set(report.originals) == {"mapped"}, report.originals
    _, stacked = weights(pipe)
    pipe.set_lycoris_strength("k", 1.0)
    pipe.set_lycoris_strength("k", 0.5)
    _, again = weights(pipe)
    assert all(torch.equal(stacked[k], again[k]) for k in stacked)
    fresh = make_pipe("flux1")
    fresh.load_lokr(kohya, "k", strength=0.5)
    fresh.load_loha(simple, "s", strength=0.7)
    assert all(torch.equal(stacked[k], v) for k, v in weights(fresh)[1].items())
    pipe.unload_lycoris()
    assert all(torch.equal(before[k], v) for k, v in weights(pipe)[1].items())


def test_sd3_text_encoders_and_a_language_model_encoder(tmp_path):
    """SD3's CLIP-L, CLIP-G and T5 as kohya names them (``lora_te1_``…``lora_te3_``); Z-Image's Qwen3
    encoder as ``lora_te_`` with or without the language model's ``model.``."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pipe = make_pipe("sd3")
    pipe.text_encoder = tiny_models.make_clip_text_model()
    pipe.text_encoder_2 = tiny_models.make_clip_text_model_with_projection()
    pipe.text_encoder_3 = tiny_t5()
    nets = {prefix: lycoris_on(model, "lokr", seed=n) for n, (prefix, model) in enumerate(
        [("lora_te1_", tiny_models.make_clip_text_model()),
         ("lora_te2_", tiny_models.make_clip_text_model_with_projection()), ("lora_te3_", tiny_t5())])}
    files = [save_lycoris(net, tmp_path / f"{prefix}.safetensors", lambda n, p=prefix: n.replace("lycoris_", p))
             for prefix, net in nets.items()]
    path = tmp_path / "sd3_te.safetensors"
    save_file({k: v for f in files for k, v in load_file(f).items()}, str(path), {"ss_base_model_version": "sd3"})
    report = pipe.load_lokr(path)
    assert report.complete and {o.block for o in report.applied} == {"TE1", "TE2", "TE3"}, report.format()

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    zimage = make_pipe("zimage")
    zimage.text_encoder = Qwen3ForCausalLM(config).eval()
    net = lycoris_on(Qwen3ForCausalLM(config), "loha")
    encoder = save_lycoris(net, tmp_path / "qwen3.safetensors",
                           lambda n: n.replace("lycoris_model_", "lora_te_") if "lm_head" not in n else n)
    report = zimage.load_loha(encoder)
    assert report.of("applied") and all(o.block == "TE" for o in report.applied), report.format()
    assert not [o for o in report.not_applied if "lm_head" not in o.module], report.format()


def _converted(tmp_path, family, variant, naming):
    """A LyCORIS file (diffusers or original names) converted to a diffusers/PEFT LoRA, exactly."""
    from safetensors.torch import save_file

    from lohakr.loaders.convert import convert_adapter

    if naming == "original":
        tree, _ = original_model(family, tiny_models.make_transformer(family))
        source = save_lycoris(lycoris_on(tree, variant), tmp_path / "source.safetensors",
                              lambda n: n.replace("lycoris_", "lora_unet_"))
    else:
        source = save_lycoris(lycoris_on(tiny_models.make_transformer(family), variant),
                              tmp_path / "source.safetensors")
    pipe = make_pipe(family)
    conversion = convert_adapter(load_adapter(source), pipeline_layout(pipe), "exact", dtype="fp32")
    out = tmp_path / "lora.safetensors"
    save_file(conversion.tensors, str(out), conversion.metadata)
    return source, out, conversion


@pytest.mark.parametrize("family, variant, naming", [
    ("flux1", "lokr_f4", "original"), ("flux1", "loha", "diffusers"), ("sd3", "lokr", "original"),
    ("qwenimage", "lokr_full", "diffusers"), ("flux2", "loha", "original")])
def test_a_converted_transformer_lora_loads_in_diffusers_to_our_weights(tmp_path, family, variant, naming):
    """Exact conversion (fused original layers split into diffusers' layers, halves swapped) written
    with diffusers/PEFT names; diffusers' own ``load_lora_weights`` + ``fuse_lora`` gives the weights
    our loader gives from the source file."""
    source, out, conversion = _converted(tmp_path, family, variant, naming)
    assert conversion.modules and all(m.method == "exact" and m.error < 1e-5 for m in conversion.modules)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in conversion.tensors)
    base, got, expected, changed = loaded_both_ways(family, source, out)
    assert len(changed) == len(conversion.modules)
    for key in changed:
        assert_patched(got[key], base[key], expected[key] - base[key], key)


def loaded_both_ways(family, source, lora):
    """The transformer weights: before, after diffusers' ``load_lora_weights`` + ``fuse_lora`` of
    ``lora``, after our load of ``source``; and the keys our load changed."""
    ours = make_pipe(family)
    ours.load_lycoris(source)
    theirs = make_pipe(family)
    base = {k: v.clone() for k, v in theirs.transformer.state_dict().items()}
    theirs.load_lora_weights(str(lora))
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    got, expected = theirs.transformer.state_dict(), ours.transformer.state_dict()
    return base, got, expected, [k for k in base if not torch.equal(expected[k], base[k])]


def test_a_converted_transformer_lora_is_a_peft_lora(tmp_path):
    """The same file through PEFT's own LoraConfig: one rank per module, lora_alpha = r (the scale is
    in lora_B), merged by PEFT's layers, equals our load."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    source, out, conversion = _converted(tmp_path, "flux1", "lokr", "original")
    state = {k.removeprefix("transformer."): v for k, v in load_file(out).items()}
    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    ranks = dict(sorted(ranks.items(), key=lambda item: -len(item[0])))  # PEFT takes the first suffix match
    config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=list(ranks),
                        rank_pattern=ranks, alpha_pattern=ranks)
    model = tiny_models.make_transformer("flux1")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapter_in_model(config, model)
    result = set_peft_model_state_dict(model, state)
    assert not [k for k in result.unexpected_keys]
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    ours = make_pipe("flux1")
    ours.load_lycoris(source)
    expected = ours.transformer.state_dict()
    for key, value in base.items():
        assert_patched(merged[key], value, expected[key] - value, key)


def test_a_dora_transformer_file_converts_with_peft_magnitudes_that_diffusers_applies(tmp_path):
    """docs/format.md#dora-in-a-lora: an output-axis DoRA LoKr on Flux.1 becomes exact LoRA factors plus
    PEFT's ``lora_magnitude_vector``; diffusers loads it as a DoRA LoRA and fuses it to our weights."""
    source, out, conversion = _converted(tmp_path, "flux1", "lokr_dora_out", "diffusers")
    assert any(k.endswith("lora_magnitude_vector") for k in conversion.tensors)
    _, got, expected, changed = loaded_both_ways("flux1", source, out)
    assert len(changed) == len(conversion.modules)
    for key in changed:
        assert max_rel(got[key], expected[key], expected[key]) <= 1e-5, key
