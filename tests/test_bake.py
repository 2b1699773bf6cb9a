"""``lohakr bake`` on a tiny SDXL diffusers folder (docs/architecture.md#baking): the baked weights
are the bits of ``pipe.load_lycoris`` + ``save_pretrained``; refusals come before anything is
written; a failed bake leaves no output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lohakr
from lohakr import BaseModelMismatchError, LohakrError
from lohakr.loaders import tiny_models
from lohakr.loaders.bake import BakeAdapter, bake
from lohakr.loaders.cli import main as cli

WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bake") / "sdxl"
    pipe = tiny_models.make_sdxl_pipeline(folder.parent / "tok")
    pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder)
    return folder


def live_bake(base: Path, out: Path, loads) -> None:
    """The same stack loaded live and saved: what the bake must equal, bit for bit."""
    from diffusers import StableDiffusionXLPipeline

    pipe = lohakr.enable(StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float16))
    pipe.set_progress_bar_config(disable=True)
    with pipe.lycoris_batch():
        for path, kwargs in loads:
            pipe.load_lycoris(path, **kwargs)
    pipe.save_pretrained(out)


def assert_same_tensors(a: Path, b: Path) -> None:
    for name in WEIGHT_FILES:
        ours, theirs = load_file(a / name), load_file(b / name)
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
            assert torch.equal(ours[key].view(torch.uint8), theirs[key].view(torch.uint8)), (name, key)


def test_bake_equals_a_live_load_saved(lycoris_file, base, tmp_path):
    loha = lycoris_file("sdxl", "loha_tucker", dtype="fp16")
    dora = lycoris_file("sdxl", "lokr_dora_out")
    full = lycoris_file("sdxl", "lokr_full")
    specs = [BakeAdapter(str(loha.path), 0.8), BakeAdapter(str(dora.path), 0.5, "OUT=0.5, IN04=0"),
             BakeAdapter(str(full.path), {"unet": -0.7, "text_encoder": 1.0, "text_encoder_2": 0.0})]
    result = bake(base, specs, tmp_path / "baked")
    assert result.patched > 0 and len(result.reports) == 3 and result.files
    live_bake(base, tmp_path / "live", [
        (loha.path, dict(strength=0.8)),
        (dora.path, dict(strength=0.5, block_weights="OUT=0.5, IN04=0")),
        (full.path, dict(strength={"unet": -0.7, "text_encoder": 1.0, "text_encoder_2": 0.0})),
    ])
    assert_same_tensors(tmp_path / "baked", tmp_path / "live")
    base_unet = load_file(base / WEIGHT_FILES[0])
    baked_unet = load_file(tmp_path / "baked" / WEIGHT_FILES[0])
    assert sum(not torch.equal(base_unet[k], baked_unet[k]) for k in base_unet) >= result.patched // 3
    # the rest of the folder comes along, and diffusers loads the result
    for name in ("model_index.json", "vae/config.json", "tokenizer/tokenizer_config.json"):
        assert (tmp_path / "baked" / name).read_bytes() == (base / name).read_bytes()
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline.from_pretrained(tmp_path / "baked")


def test_the_command_line(lycoris_file, base, tmp_path, capsys):
    path = lycoris_file("sdxl", "lokr_f4").path
    assert cli(["bake", str(base), "--adapter", f"{path}:0.6", "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "tensors patched" in printed and "modules applied" in printed
    live_bake(base, tmp_path / "live", [(path, dict(strength=0.6))])
    assert_same_tensors(tmp_path / "out", tmp_path / "live")


def test_adapter_specs():
    assert BakeAdapter.parse("a.safetensors") == BakeAdapter("a.safetensors")
    assert BakeAdapter.parse("a.safetensors:0.5") == BakeAdapter("a.safetensors", 0.5)
    assert BakeAdapter.parse("C:/x/a.safetensors:-1:OUT=0.5, IN04=0") == BakeAdapter(
        "C:/x/a.safetensors", -1.0, "OUT=0.5, IN04=0")


def test_refusals_write_nothing(lycoris_file, base, tmp_path):
    sd1_file = lycoris_file("sd1", "loha", metadata={"ss_base_model_version": "sd_v1"}).path
    with pytest.raises(BaseModelMismatchError, match="SD1.5 adapter"):
        bake(base, [str(sd1_file)], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())
    good = str(lycoris_file("sdxl", "lokr_f4").path)
    with pytest.raises(LohakrError, match="into the base model"):
        bake(base, [good], base / "inside")
    (tmp_path / "exists").mkdir()
    with pytest.raises(LohakrError, match="already exists"):
        bake(base, [good], tmp_path / "exists")
    with pytest.raises(LohakrError, match="a strength is a finite number"):
        bake(base, [BakeAdapter(good, float("nan"))], tmp_path / "out")
    assert cli(["bake", str(base), "--adapter", str(sd1_file), "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_bake_stopped_midway_leaves_no_output(lycoris_file, base, tmp_path):
    seen = []

    def progress(items, total):
        for number, item in enumerate(items):
            if number == total // 2:
                raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of a file
            seen.append(item)
            yield item

    with pytest.raises(KeyboardInterrupt):
        bake(base, [str(lycoris_file("sdxl", "lokr_f4").path)], tmp_path / "out", progress=progress)
    assert seen and not list(tmp_path.iterdir())  # no output, no staging folder left


@pytest.fixture(scope="module")
def checkpoint(base) -> Path:
    """The tiny SDXL of ``base`` as a single-file checkpoint in original SGM keys (bigG in OpenCLIP's
    layout, q/k/v fused into ``in_proj``)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float16)
    path = base.parent / "sdxl_single.safetensors"
    save_file(tiny_models.sgm_checkpoint_state(pipe.unet, pipe.text_encoder, pipe.text_encoder_2), str(path))
    return path


def test_the_checkpoint_export_is_what_diffusers_reads_back(base, checkpoint):
    """The test's own single-file export, checked by diffusers' converters: UNet and CLIP-L by
    ``from_single_file``, bigG by ``convert_open_clip_checkpoint``."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    pipe = StableDiffusionXLPipeline.from_pretrained(base, dtype=torch.float16)
    read = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(base), vae=pipe.vae,
                                                      local_files_only=True, torch_dtype=torch.float16)
    for component in ("unet", "text_encoder"):
        theirs = getattr(read, component).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(pipe, component).state_dict().items()), component
    big = convert_open_clip_checkpoint(tiny_models.make_clip_text_model_with_projection(), load_file(checkpoint),
                                       prefix="conditioner.embedders.1.model.")
    assert all(torch.equal(v, big[k]) for k, v in pipe.text_encoder_2.state_dict().items())


def test_a_single_file_bake_is_the_live_load_in_original_keys(lycoris_file, base, checkpoint, tmp_path):
    """Baked into the single-file checkpoint (q/k/v of bigG as rows of its fused in_proj), every
    tensor equals the live load's, bit for bit, in the checkpoint's own keys; untouched tensors and
    the key order are the checkpoint's."""
    loha = lycoris_file("sdxl", "loha_tucker", dtype="fp16")
    dora = lycoris_file("sdxl", "lokr_dora_out")
    specs = [BakeAdapter(str(loha.path), 0.8), BakeAdapter(str(dora.path), 0.5, "OUT=0.5, IN04=0")]
    out = tmp_path / "baked.safetensors"
    result = bake(checkpoint, specs, out)
    assert result.files == [out.name] and all(r.complete for r in result.reports), result.format()
    live_bake(base, tmp_path / "live", [(loha.path, dict(strength=0.8)),
                                        (dora.path, dict(strength=0.5, block_weights="OUT=0.5, IN04=0"))])
    from diffusers import StableDiffusionXLPipeline

    live = StableDiffusionXLPipeline.from_pretrained(tmp_path / "live", dtype=torch.float16)
    expected = tiny_models.sgm_checkpoint_state(live.unet, live.text_encoder, live.text_encoder_2)
    baked, original = load_file(out), load_file(checkpoint)
    assert list(baked) == list(original)
    changed = [k for k in baked if not torch.equal(baked[k], original[k])]
    assert any(".in_proj_weight" in k for k in changed) and any(k.startswith("model.") for k in changed)
    for key, value in baked.items():
        assert torch.equal(value.view(torch.uint8), expected[key].view(torch.uint8)), key


def test_a_killed_single_file_bake_leaves_nothing(lycoris_file, checkpoint, tmp_path, monkeypatch):
    from lohakr.loaders import bake as bake_module

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bake_module, "_patched_bytes", fail)
    with pytest.raises(KeyboardInterrupt):
        bake(checkpoint, [str(lycoris_file("sdxl", "loha").path)], tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("naming", ["lycoris_", "lora_unet_"])
def test_a_transformer_folder_bake_is_the_live_load(tmp_path, naming):
    """A Flux.1 diffusers folder (transformer/ and a CLIP text_encoder/): baked, it equals the live load
    saved, bit for bit; kohya's BFL names split onto diffusers' layers as in a live load."""
    from diffusers import FluxTransformer2DModel
    from lycoris_oracle import lycoris_on, save_lycoris
    from test_transformers import original_model
    from transformers import CLIPTextModel

    folder = tmp_path / "flux"
    tiny_models.make_transformer("flux1").to(torch.bfloat16).save_pretrained(folder / "transformer")
    tiny_models.make_clip_text_model().save_pretrained(folder / "text_encoder")
    if naming == "lycoris_":
        net = lycoris_on(tiny_models.make_transformer("flux1"), "lokr_f4")
        path = save_lycoris(net, tmp_path / "a.safetensors")
    else:
        tree, _ = original_model("flux1", tiny_models.make_transformer("flux1"))
        path = save_lycoris(lycoris_on(tree, "loha"), tmp_path / "a.safetensors",
                            lambda n: n.replace("lycoris_", "lora_unet_"))
    result = bake(folder, [BakeAdapter(str(path), 0.7)], tmp_path / "baked")
    assert result.patched and all(r.complete for r in result.reports), result.format()

    class Pipe:
        transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.bfloat16)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")

    pipe = lohakr.enable(Pipe())
    pipe.load_lycoris(path, strength=0.7)
    baked = load_file(tmp_path / "baked" / "transformer" / "diffusion_pytorch_model.safetensors")
    live = pipe.transformer.state_dict()
    assert baked.keys() == live.keys()
    for key, value in baked.items():
        assert torch.equal(value.view(torch.uint8), live[key].contiguous().view(torch.uint8)), key
