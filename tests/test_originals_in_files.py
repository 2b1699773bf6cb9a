"""Originals kept in the safetensors files a pipeline was loaded from (docs/architecture.md#originals-in-files).

A pipeline loaded with ``from_pretrained`` from a local folder holds its weights as views of the
mapped files ("mapped"): those views are the originals, nothing is copied. Where the weights were
copied into memory since ("copied", as a loader that casts or moves them does), they are patched in
place and read back from the files. Either way: nothing held in memory but biases, unload
bit-exact, a weight edited since loading kept as edited (in memory, said in the report, where it
was copied), a file modified on disk refused with the model left as it was. Sharded folders and
single SGM-key checkpoints (``source_files=``) included.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lohakr
from lohakr import LohakrError, SourceFileChangedError
from lohakr.loaders import tiny_models
from lohakr.loaders.diffusers_pipeline import pipeline_layout

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def saved_sdxl(tmp_path: Path, dtype=torch.float16, **save) -> Path:
    pipe = tiny_models.make_sdxl_pipeline(tmp_path / "tok")
    pipe.to(dtype=dtype)
    folder = tmp_path / "sdxl"
    pipe.save_pretrained(folder, **save)
    return folder


def load(folder: Path, dtype=torch.float16, memory="mapped", **enable):
    """The pipeline saved in ``folder``; ``memory="copied"``: every weight copied out of the mapped
    files into ordinary memory, as a loader that casts or moves weights leaves them."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype)
    if memory == "copied":
        for component in COMPONENTS:
            for param in getattr(pipe, component).parameters():
                param.data = param.data.clone()
    pipe.set_progress_bar_config(disable=True)
    return lohakr.enable(pipe, **enable)


def snapshot(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def weight_bytes(pipe, keys) -> int:
    targets = pipeline_layout(pipe).targets
    return sum(targets[k].layer.weight.numel() * targets[k].layer.weight.element_size() for k in keys)


@pytest.mark.parametrize("memory, place", [("mapped", "mapped"), ("copied", "file")])
def test_originals_stay_in_the_files_and_unload_is_bit_exact(lycoris_file, tmp_path, memory, place):
    pipe = load(saved_sdxl(tmp_path), memory=memory)
    before = snapshot(pipe)
    storage = {k: t.layer.weight.data_ptr() for k, t in pipeline_layout(pipe).targets.items()}
    report = pipe.load_loha(lycoris_file("sdxl", "loha_tucker").path, strength=0.8)
    assert set(report.originals) == {place}
    assert report.originals[place]["layers"] == len(report.applied)
    files = sorted(Path(f).relative_to((tmp_path / "sdxl").resolve()).as_posix()
                   for f in report.originals[place]["files"])
    assert files == ["text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                     "unet/diffusion_pytorch_model.safetensors"]
    assert "source file" in report.format()
    patcher = pipe._lohakr_patcher
    bias_bytes = sum(o.bias.numel() * o.bias.element_size() for o in patcher.originals.values() if o.bias is not None)
    assert patcher.kept_bytes == bias_bytes  # weights: none held in memory
    assert patcher.kept_bytes < weight_bytes(pipe, [o.target for o in report.applied]) / 10
    # copied: patched in place, every weight kept its storage; mapped: the patched ones got new storage
    moved = {k for k, t in pipeline_layout(pipe).targets.items() if t.layer.weight.data_ptr() != storage[k]}
    assert moved == (set() if memory == "copied" else {o.target for o in report.applied})
    patched = snapshot(pipe)
    assert not same(before, patched)
    pipe.set_lycoris_strength(report.adapter, 0.3)
    pipe.set_lycoris_strength(report.adapter, 0.8)
    assert same(patched, snapshot(pipe))  # from the file again, bit for bit
    pipe.unload_lycoris()
    assert same(before, snapshot(pipe))
    assert len(patcher.originals) == 0


def test_same_weights_as_originals_in_memory(lycoris_file, tmp_path):
    folder = saved_sdxl(tmp_path)
    mapped, in_file, in_memory = load(folder), load(folder, memory="copied"), load(folder, keep_originals_on="cpu")
    for pipe in (mapped, in_file, in_memory):
        with pipe.lycoris_batch():
            pipe.load_loha(lycoris_file("sdxl", "loha", naming="kohya").path, "a", strength=0.6)
            pipe.load_lokr(lycoris_file("sdxl", "lokr_dora_out").path, "b", strength=0.5)
            pipe.load_lokr(lycoris_file("sdxl", "lokr_full").path, "c", text_encoder_strength=-1.0)
        pipe.set_lycoris_strength("a", 0.9)
        pipe.unload_lycoris("c")
    assert set(in_memory.lycoris_adapters()[0].report.originals) == {"ram"}
    assert same(snapshot(in_file), snapshot(in_memory)) and same(snapshot(mapped), snapshot(in_memory))


def test_a_sharded_folder(lycoris_file, tmp_path):
    folder = saved_sdxl(tmp_path, max_shard_size="20KB")
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    pipe = load(folder, memory="copied")
    before = snapshot(pipe)
    report = pipe.load_lokr(lycoris_file("sdxl", "lokr_f4").path)
    assert set(report.originals) == {"file"} and len(report.originals["file"]["files"]) > 3
    pipe.unload_lycoris()
    assert same(before, snapshot(pipe))


@pytest.mark.parametrize("memory", ["mapped", "copied"])
def test_a_weight_edited_after_loading_comes_back_as_edited(lycoris_file, tmp_path, memory):
    pipe = load(saved_sdxl(tmp_path), memory=memory)
    layout = pipeline_layout(pipe)
    edited = next(t for t in layout.targets.values() if t.component == "unet" and t.path.endswith("attn1.to_q"))
    with torch.no_grad():
        edited.layer.weight.mul_(0.5)  # e.g. a user's own merge, after from_pretrained
    before = snapshot(pipe)
    report = pipe.load_loha(lycoris_file("sdxl", "loha").path)
    assert edited.key in {o.target for o in report.applied}
    if memory == "copied":  # found different from the file: kept in memory, and said so
        assert report.originals["ram"]["layers"] == 1
        assert report.originals["file"]["layers"] == len(report.applied) - 1
        assert any(edited.key in w and "kept in memory" in w for w in report.warnings)
    else:  # the edit lives in the view's own (copied-on-write) pages: that view is the original
        assert set(report.originals) == {"mapped"} and not report.warnings
    pipe.set_lycoris_strength(report.adapter, 0.25)
    pipe.unload_lycoris()
    assert same(before, snapshot(pipe))  # the edited weight comes back as edited, not as in the file


@pytest.mark.parametrize("change", ["rewritten", "replaced", "deleted", "touched"])
@pytest.mark.parametrize("memory", ["mapped", "copied"])
def test_a_file_changed_on_disk_is_refused_and_the_model_left_as_it_was(lycoris_file, tmp_path, change, memory):
    folder = saved_sdxl(tmp_path)
    pipe = load(folder, memory=memory)
    before = snapshot(pipe)
    pipe.load_lokr(lycoris_file("sdxl", "lokr_f4").path, "a", strength=0.7)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    if change == "rewritten":  # same size, other bytes, in place
        data = bytearray(path.read_bytes())
        data[-64:] = bytes(64)
        path.write_bytes(bytes(data))
    elif change == "replaced":  # a new file renamed over it
        other = tmp_path / "other.safetensors"
        save_file({"x": torch.zeros(3)}, str(other))
        os.replace(other, path)
    elif change == "deleted":
        path.unlink()
    else:
        os.utime(path, ns=(1, 1))
    # diffusers' weights are copy-on-write views of the file: rewriting it in place changes them
    # (the kernel drops even written pages on truncation), whatever lohakr does. What lohakr owes is
    # to write nothing more: the model as it was just before each refused call.
    patched = snapshot(pipe)
    if memory == "mapped" and change in ("replaced", "deleted"):
        # the mapped file is the old one, intact under no name or a new one: still the originals
        pipe.unload_lycoris("a")
        assert same(before, snapshot(pipe))
        return
    for action in (lambda: pipe.set_lycoris_strength("a", 0.2), lambda: pipe.unload_lycoris("a")):
        with pytest.raises(SourceFileChangedError, match=str(path.name)) as caught:
            action()
        assert "reload" in str(caught.value)
        assert same(patched, snapshot(pipe))
        assert [a.strength["unet"] for a in pipe.lycoris_adapters()] == [0.7]


@pytest.mark.parametrize("memory", ["mapped", "copied"])
def test_a_failed_batch_restores_from_the_files(lycoris_file, tmp_path, memory):
    pipe = load(saved_sdxl(tmp_path), memory=memory)
    pipe.load_loha(lycoris_file("sdxl", "loha").path, "a", strength=0.5)
    patched = snapshot(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with pipe.lycoris_batch():
            pipe.set_lycoris_strength("a", 1.0)
            pipe.load_lokr(lycoris_file("sdxl", "lokr_f4").path, "b")
            raise RuntimeError("boom")
    assert same(patched, snapshot(pipe))
    assert [a.name for a in pipe.lycoris_adapters()] == ["a"]


def test_fuse_and_in_memory_policies_do_not_use_the_files(lycoris_file, tmp_path):
    folder = saved_sdxl(tmp_path)
    report = load(folder, keep_originals_on=None).load_loha(lycoris_file("sdxl", "loha").path)
    assert set(report.originals) == {"ram"}
    report = load(folder, fuse=True).load_loha(lycoris_file("sdxl", "loha").path)
    assert report.originals == {}


def sgm_checkpoint(pipe, path: Path) -> None:
    """The pipeline's UNet and CLIP-L as an original SGM single file (as ``from_single_file`` reads):
    UNet layers under ``model.diffusion_model.<SGM path>``, CLIP-L under
    ``conditioner.embedders.0.transformer.text_model.``; CLIP-G left out (OpenCLIP fuses its q/k/v)."""
    tensors = {}
    for target in pipeline_layout(pipe).targets.values():
        weight = target.layer.weight.detach().contiguous()
        if target.component == "unet":
            tensors[f"model.diffusion_model.{target.sgm_path}.weight"] = weight
    for name, value in pipe.text_encoder.state_dict().items():
        bare = name.removeprefix("text_model.")
        tensors[f"conditioner.embedders.0.transformer.text_model.{bare}"] = value.contiguous()
    save_file(tensors, str(path))


def test_a_single_file_checkpoint_given_as_source(lycoris_file, tmp_path):
    pipe = tiny_models.make_sdxl_pipeline(tmp_path / "tok")
    pipe.to(dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    checkpoint = tmp_path / "sdxl_base.safetensors"
    sgm_checkpoint(pipe, checkpoint)
    lohakr.enable(pipe, source_files=checkpoint)
    before = snapshot(pipe)
    report = pipe.load_loha(lycoris_file("sdxl", "loha_tucker").path, strength=0.9)
    by_component = {}
    for outcome in report.applied:
        by_component.setdefault(outcome.target.split(".")[0], set()).add(outcome.target)
    te2 = len(by_component["text_encoder_2"])
    assert report.originals["file"]["files"] == [str(checkpoint.resolve())]
    assert report.originals["file"]["layers"] == len(report.applied) - te2
    assert report.originals["ram"]["layers"] == te2
    pipe.set_lycoris_strength(report.adapter, -0.4)
    pipe.unload_lycoris()
    assert same(before, snapshot(pipe))


def test_source_files_that_do_not_exist_are_an_error(lycoris_file, tmp_path):
    pipe = tiny_models.make_sdxl_pipeline(tmp_path / "tok")
    lohakr.enable(pipe, source_files=tmp_path / "missing.safetensors")
    before = snapshot(pipe)
    with pytest.raises(LohakrError, match="missing.safetensors does not exist"):
        pipe.load_loha(lycoris_file("sdxl", "loha").path)
    assert same(before, snapshot(pipe)) and pipe.lycoris_adapters() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU model's originals in its files)")
def test_a_gpu_model_keeps_its_originals_in_the_files(lycoris_file, tmp_path):
    """Moved to a GPU after loading: compared with the files on the device, patched in place there,
    read back from the files (copied to the device) on a strength change and unload; the same bits
    as originals kept in GPU memory."""
    folder = saved_sdxl(tmp_path)
    in_file, in_memory = load(folder), load(folder, keep_originals_on=None)
    for pipe in (in_file, in_memory):
        pipe.to("cuda")
    before = snapshot(in_file)
    adapter = lycoris_file("sdxl", "lokr_f4").path
    for pipe in (in_file, in_memory):
        report = pipe.load_lokr(adapter, "a", strength=0.7)
        pipe.load_loha(lycoris_file("sdxl", "loha").path, "b", strength=0.4)
        pipe.set_lycoris_strength("a", 0.3)
    assert set(report.originals) == {"gpu"}
    assert set(in_file.lycoris_adapters()[0].report.originals) == {"file"}
    assert same(snapshot(in_file), snapshot(in_memory))
    in_file.unload_lycoris()
    assert same(before, snapshot(in_file))
