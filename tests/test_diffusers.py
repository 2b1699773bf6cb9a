"""diffusers: pipe.load_loha / load_lokr on tiny SDXL and SD1.5 pipelines, against real LyCORIS."""

from __future__ import annotations

import logging

import pytest
import torch
from lycoris_oracle import VARIANTS

import lohakr
from lohakr import LohakrError, StrictLoadError, load_adapter
from lohakr.loaders import tiny_models
from lohakr.loaders.diffusers_pipeline import pipeline_layout

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def make_pipe(family, tmp_path, dtype=torch.float32, origin="memory"):
    """A tiny pipeline. ``origin="mapped"``: saved as a diffusers folder and loaded back with
    ``from_pretrained`` (weights are views of the mapped files, which keep the originals);
    ``"copied"``: then copied into memory (patched in place, originals read back from the files);
    docs/architecture.md#originals-in-files."""
    if family == "sdxl":
        pipe = tiny_models.make_sdxl_pipeline(tmp_path / "tok")
    else:
        pipe = tiny_models.make_sd15_pipeline(tmp_path / "tok")
    pipe.to(dtype=dtype)
    if origin != "memory":
        folder = tmp_path / f"saved_{family}_{str(dtype)[6:]}"
        if not folder.exists():
            pipe.save_pretrained(folder)
        pipe = type(pipe).from_pretrained(folder, dtype=dtype)
        if origin == "copied":
            for component in COMPONENTS:
                for param in getattr(pipe, component).parameters() if getattr(pipe, component, None) else ():
                    param.data = param.data.clone()
    pipe.set_progress_bar_config(disable=True)
    return lohakr.enable(pipe)


def snapshot(pipe):
    return {f"{c}.{k}": v.detach().clone() for c in COMPONENTS if getattr(pipe, c, None) is not None
            for k, v in getattr(pipe, c).state_dict().items()}


def layer_weights(pipe):
    layout = pipeline_layout(pipe)
    return layout, {key: t.layer.weight.detach().clone() for key, t in layout.targets.items()}


def max_rel(got, ref, scale_of):
    return float((got - ref).abs().max() / scale_of.abs().max().clamp_min(1e-30))


def assert_patched(got, w0, delta, what=""):
    """``got == w0 + delta`` up to 1e-5 of ΔW plus the float32 rounding of storing the sum."""
    expected = w0 + delta
    err = float((got.float() - expected).abs().max())
    allowed = 1e-5 * float(delta.abs().max()) + 4 * torch.finfo(torch.float32).eps * float(expected.abs().max())
    assert err <= allowed, (what, err, allowed)


def loader_for(variant):
    return "load_loha" if variant.startswith("loha") else "load_lokr"


@pytest.mark.parametrize("origin", ["memory", "mapped", "copied"])
@pytest.mark.parametrize("family", ["sdxl", "sd1"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_patched_weights_equal_lycoris_reference(lycoris_file, tmp_path, family, variant, origin):
    naming = "kohya" if family == "sdxl" and variant in ("loha", "lokr_tucker", "loha_dora_in") else "diffusers"
    fx = lycoris_file(family, variant, naming=naming)
    pipe = make_pipe(family, tmp_path, origin=origin)
    strength = 0.7
    report = getattr(pipe, loader_for(variant))(fx.path, strength=strength)
    assert report.complete and len(report.applied) == len(fx.expected)
    assert set(report.originals) == {{"memory": "ram", "copied": "file"}.get(origin, origin)}, report.originals
    layout = pipeline_layout(pipe)
    for outcome in report.applied:
        ref = fx.expected[outcome.module]
        got = layout.targets[outcome.target].layer.weight.detach()
        if ref.dora:  # documented: W0 + μ·(DoRA(W0 + sR) − W0), LyCORIS' μ = 1 result as the anchor
            expected = ref.w0 + strength * (ref.patched - ref.w0)
            assert max_rel(got, expected, expected) <= 1e-5, outcome.module
        else:
            assert_patched(got, ref.w0, strength * ref.delta, outcome.module)


@pytest.mark.parametrize("family, variant", [("sdxl", "loha"), ("sdxl", "lokr_tucker"), ("sd1", "loha_tucker"),
                                             ("sd1", "lokr_full"), ("sdxl", "loha_dora_out"), ("sd1", "lokr_dora_in")])
def test_outputs_match_lycoris_network_forward(lycoris_file, tmp_path, family, variant):
    """UNet and text-encoder outputs equal LyCORIS' own network applied at the same multiplier."""
    fx = lycoris_file(family, variant)
    multiplier = 1.0 if "dora" in variant else 0.6
    fx.network.set_multiplier(multiplier)
    try:
        pipe = make_pipe(family, tmp_path)
        getattr(pipe, loader_for(variant))(fx.path, strength=multiplier)
        g = torch.Generator().manual_seed(3)
        width = 64 if family == "sdxl" else 32
        inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor(400),
                      encoder_hidden_states=torch.randn(1, 7, width, generator=g))
        if family == "sdxl":
            inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, 32, generator=g),
                                               time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]))
        ids = torch.tensor([[tiny_models.BOS_ID, 72, 101, 108, tiny_models.EOS_ID]])
        with torch.no_grad():
            ours = pipe.unet(**inputs).sample
            theirs = fx.models.unet(**inputs).sample
            base = tiny_models.make_sdxl_unet() if family == "sdxl" else tiny_models.make_sd15_unet()
            plain = base(**inputs).sample
            assert max_rel(ours, theirs, theirs) < 1e-4
            assert max_rel(plain, theirs, theirs) > 1e-3  # the adapter really changes the output
            for component, model in fx.models.text_encoders.items():
                a = getattr(pipe, component)(ids).last_hidden_state
                b = model(ids).last_hidden_state
                assert max_rel(a, b, b) < 1e-4
    finally:
        fx.network.set_multiplier(1.0)


@pytest.mark.parametrize("origin", ["memory", "mapped", "copied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unload_is_bit_exact_and_denoising_is_identical(lycoris_file, tmp_path, dtype, origin):
    pipe = make_pipe("sdxl", tmp_path, dtype, origin)
    before = snapshot(pipe)

    def latent():
        g = torch.Generator().manual_seed(0)
        return pipe("a cat", num_inference_steps=3, height=32, width=32, generator=g, output_type="latent").images

    if dtype == torch.float32:
        reference_latent = latent()
    pipe.load_loha(lycoris_file("sdxl", "loha_tucker").path, strength=0.8)
    pipe.load_lokr(lycoris_file("sdxl", "lokr_dora_out").path, strength=0.5)
    pipe.load_lycoris(lycoris_file("sdxl", "loha", naming="kohya").path, "third", text_encoder_strength=-1.0)
    changed = snapshot(pipe)
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    pipe.unload_lycoris("third")
    pipe.unload_lycoris()
    after = snapshot(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert pipe.lycoris_adapters() == []
    if dtype == torch.float32:
        assert torch.equal(latent(), reference_latent)


def test_stack_is_sum_and_independent_of_order(lycoris_file, tmp_path):
    a = lycoris_file("sdxl", "loha")
    b = lycoris_file("sdxl", "lokr_f4")
    pipe1, pipe2 = make_pipe("sdxl", tmp_path), make_pipe("sdxl", tmp_path)
    pipe1.load_loha(a.path, strength=0.6)
    pipe1.load_lokr(b.path, strength=-0.8)
    pipe2.load_lokr(b.path, strength=-0.8)
    pipe2.load_loha(a.path, strength=0.6)
    layout, w1 = layer_weights(pipe1)
    _, w2 = layer_weights(pipe2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    delta_a = load_adapter(a.path)
    delta_b = load_adapter(b.path)
    checked = 0
    for name, ref in a.expected.items():
        target = layout.resolve(name)
        assert_patched(w1[target.key], ref.w0, 0.6 * ref.delta - 0.8 * b.expected[name].delta, name)
        checked += 1
    assert checked == len(delta_a) == len(delta_b)


def test_set_strength_equals_loading_at_that_strength(lycoris_file, tmp_path):
    fx = lycoris_file("sd1", "lokr_tucker")
    pipe1, pipe2 = make_pipe("sd1", tmp_path), make_pipe("sd1", tmp_path)
    pipe1.load_lokr(fx.path, "x", strength=1.0)
    pipe1.set_lycoris_strength("x", {"unet": 0.3, "text_encoder": -0.5})
    pipe2.load_lokr(fx.path, "x", strength={"unet": 0.3, "text_encoder": -0.5})
    _, w1 = layer_weights(pipe1)
    _, w2 = layer_weights(pipe2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert pipe1.lycoris_adapters()[0]["strength"]["unet"] == 0.3
    pipe1.set_lycoris_strength("x", block_weights="IN04=0")
    pipe2.unload_lycoris("x")
    pipe2.load_lokr(fx.path, "x", strength={"unet": 0.3, "text_encoder": -0.5}, block_weights="IN04=0")
    _, w1 = layer_weights(pipe1)
    _, w2 = layer_weights(pipe2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_block_weights_touch_only_named_blocks(lycoris_file, tmp_path):
    fx = lycoris_file("sdxl", "loha", naming="kohya")
    pipe = make_pipe("sdxl", tmp_path)
    layout, before = layer_weights(pipe)
    pipe.load_loha(fx.path, block_weights="IN04=0, TE2=0, OUT05=0.5")
    _, after = layer_weights(pipe)
    blocks_changed = {layout.targets[k].block for k in before if not torch.equal(before[k], after[k])}
    assert "IN04" not in blocks_changed and "TE2" not in blocks_changed
    assert {"IN05", "TE1", "OUT05", "M00"} <= blocks_changed
    for name, ref in fx.expected.items():
        target = layout.resolve(name)
        if target.block == "OUT05":
            assert_patched(after[target.key], ref.w0, 0.5 * ref.delta, name)


def test_short_vector_warns_about_zeroed_blocks(lycoris_file, tmp_path, caplog):
    pipe = make_pipe("sdxl", tmp_path)
    with caplog.at_level(logging.WARNING, logger="lohakr"):
        report = pipe.load_loha(lycoris_file("sdxl", "loha").path, block_weights="1,1,1,1,1,1,1,1,1,1,1,1")
    assert any("does not list IN00, IN01, IN02, IN03, IN06" in w for w in report.warnings)
    assert "weight 0" in caplog.text


def test_strict_mismatch_raises_before_any_weight_changes(lycoris_file, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lycoris_file("sdxl", "loha").path))
    tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_zz.hada_w1_a"] = torch.ones(4, 2)
    tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_zz.hada_w1_b"] = torch.ones(2, 4)
    tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_zz.hada_w2_a"] = torch.ones(4, 2)
    tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_zz.hada_w2_b"] = torch.ones(2, 4)
    path = tmp_path / "extra.safetensors"
    save_file(tensors, str(path))
    pipe = make_pipe("sdxl", tmp_path)
    before = snapshot(pipe)
    with pytest.raises(StrictLoadError, match="attn1_to_zz \\[unmatched\\]"):
        pipe.load_loha(path, strict=True)
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())
    report = pipe.load_loha(path)  # not strict: applies the rest and says what it skipped
    assert [o.module for o in report.not_applied] == [
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_zz"]


def test_wrong_method_duplicate_name_and_unknown_adapter(lycoris_file, tmp_path):
    pipe = make_pipe("sdxl", tmp_path)
    lokr = lycoris_file("sdxl", "lokr").path
    with pytest.raises(LohakrError, match=r"has no LoHa module \(287 LoKr\); use pipe.load_lokr"):
        pipe.load_loha(lokr)
    pipe.load_lokr(lokr)
    with pytest.raises(LohakrError, match="already loaded; pass adapter_name"):
        pipe.load_lycoris(lokr)
    with pytest.raises(LohakrError, match="no LyCORIS adapter named 'nope'"):
        pipe.set_lycoris_strength("nope", 0.5)
    with pytest.raises(LohakrError, match="unknown component"):
        pipe.load_lycoris(lokr, "again", strength={"vae": 1.0})
    assert [a["name"] for a in pipe.lycoris_adapters()] == [lokr.stem]


def test_sd15_file_on_sdxl_pipeline_is_refused_untouched(lycoris_file, tmp_path):
    fx = lycoris_file("sd1", "loha", metadata={"ss_base_model_version": "sd_v1"})
    pipe = make_pipe("sdxl", tmp_path)
    before = snapshot(pipe)
    with pytest.raises(lohakr.BaseModelMismatchError, match="SD1.5 adapter"):
        pipe.load_loha(fx.path)
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())


def test_next_to_diffusers_own_lora(lycoris_file, tmp_path):
    """A PEFT-wrapped layer gets its base weight patched; unloading ours leaves theirs intact."""
    from peft import LoraConfig

    pipe = make_pipe("sdxl", tmp_path)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k"], init_lora_weights=False))
    peft_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    base_before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    fx = lycoris_file("sdxl", "loha")
    report = pipe.load_loha(fx.path)
    assert report.complete
    to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    ref = fx.expected["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert_patched(to_q.base_layer.weight.detach(), ref.w0, ref.delta)
    pipe.unload_lycoris()
    state = pipe.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in peft_before.items())
    assert all(torch.equal(state[k], v) for k, v in base_before.items())


def test_report_logging_and_progress(lycoris_file, tmp_path, caplog, capsys):
    from diffusers.utils import logging as diffusers_logging

    pipe = make_pipe("sdxl", tmp_path)
    pipe.set_progress_bar_config(disable=False)
    with caplog.at_level(logging.INFO, logger="lohakr"):
        report = pipe.load_loha(lycoris_file("sdxl", "loha").path, "one")
    assert "lohakr: one: 287/287 modules applied" in caplog.text
    assert report.strength == {"unet": 1.0, "text_encoder": 1.0, "text_encoder_2": 1.0}
    assert "lohakr: one" in capsys.readouterr().err  # the tqdm bar
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lokr(lycoris_file("sdxl", "lokr").path, "two")
        assert "lohakr: two" not in capsys.readouterr().err
    finally:
        diffusers_logging.set_verbosity_warning()


def test_enable_keeps_the_pipeline_class_and_mixin_works(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = make_pipe("sdxl", tmp_path)
    assert type(pipe) is StableDiffusionXLPipeline and callable(pipe.load_loha)

    class MyPipeline(lohakr.LycorisLoaderMixin, StableDiffusionXLPipeline):
        pass

    assert hasattr(MyPipeline, "load_lokr") and hasattr(MyPipeline, "unload_lycoris")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for enable_model_cpu_offload")
def test_model_cpu_offload_on_cuda(lycoris_file, tmp_path):
    fx = lycoris_file("sdxl", "loha")
    pipe = make_pipe("sdxl", tmp_path, torch.float16)
    pipe.enable_model_cpu_offload()
    before = snapshot(pipe)
    pipe.load_loha(fx.path)
    g = torch.Generator().manual_seed(0)
    pipe("a cat", num_inference_steps=2, height=32, width=32, generator=g, output_type="latent")
    pipe.unload_lycoris()
    assert all(torch.equal(before[k].cpu(), v.cpu()) for k, v in snapshot(pipe).items())


# -- batching, storage and placement of originals ---------------------------------------------------
def count_layer_passes(monkeypatch):
    """Counts how many times the engine rebuilds a layer."""
    from lohakr.loaders.patcher import WeightPatcher

    passes = {"n": 0}
    original_write = WeightPatcher._write_layer

    def counting(self, *args, **kwargs):
        passes["n"] += 1
        return original_write(self, *args, **kwargs)

    monkeypatch.setattr(WeightPatcher, "_write_layer", counting)
    return passes


def test_batch_equals_one_by_one_with_one_pass_per_layer(lycoris_file, tmp_path, monkeypatch):
    files = [lycoris_file("sdxl", v).path for v in ("loha", "lokr_f4", "loha_tucker")]
    one_by_one, batched = make_pipe("sdxl", tmp_path), make_pipe("sdxl", tmp_path)
    passes = count_layer_passes(monkeypatch)
    for i, path in enumerate(files):
        one_by_one.load_lycoris(path, f"a{i}", strength=0.5 + i)
    sequential_passes, passes["n"] = passes["n"], 0
    _, untouched = layer_weights(batched)
    with batched.lycoris_batch():
        for i, path in enumerate(files):
            batched.load_lycoris(path, f"a{i}", strength=0.5 + i)
        _, inside = layer_weights(batched)
        assert all(torch.equal(inside[k], untouched[k]) for k in inside)  # nothing changes before the end
    touched = {m.target.key for a in batched._lohakr_patcher for m in a.matches}
    assert passes["n"] == len(touched) < sequential_passes
    _, w1 = layer_weights(one_by_one)
    _, w2 = layer_weights(batched)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    with batched.lycoris_batch():  # strength changes and unloads batch too
        batched.set_lycoris_strength("a0", 0.25)
        batched.unload_lycoris("a1")
    one_by_one.set_lycoris_strength("a0", 0.25)
    one_by_one.unload_lycoris("a1")
    _, w1 = layer_weights(one_by_one)
    _, w2 = layer_weights(batched)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_batch_failing_at_the_end_removes_its_adapters(lycoris_file, tmp_path, monkeypatch):
    from lohakr.loaders import apply
    from lohakr.loaders.updates import LokrUpdate

    pipe = make_pipe("sdxl", tmp_path)
    pipe.load_loha(lycoris_file("sdxl", "loha").path, "kept")
    before = snapshot(pipe)
    real_patch = apply.patch

    def broken_for_lokr(out, source, contributions, workspace=None):
        if any(isinstance(update, LokrUpdate) for update, _ in contributions):
            raise RuntimeError("simulated out of memory")
        return real_patch(out, source, contributions, workspace)

    monkeypatch.setattr(apply, "patch", broken_for_lokr)
    with pytest.raises(RuntimeError, match="simulated"):
        with pipe.lycoris_batch():
            pipe.load_loha(lycoris_file("sdxl", "loha_tucker").path, "new1")
            pipe.load_lokr(lycoris_file("sdxl", "lokr_f4").path, "new2")
    assert [a["name"] for a in pipe.lycoris_adapters()] == ["kept"]
    after = snapshot(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batch_is_all_or_nothing_when_a_file_inside_fails(lycoris_file, tmp_path):
    """A batch is a transaction: a bad file inside it undoes the loads and strength changes before
    it (weights and registry exactly as before the block), and the error names the file."""
    pipe = make_pipe("sdxl", tmp_path)
    pipe.load_loha(lycoris_file("sdxl", "loha").path, "kept", strength=0.5)
    before = snapshot(pipe)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LohakrError, match="bad.safetensors"):
        with pipe.lycoris_batch():
            pipe.set_lycoris_strength("kept", 0.9)
            pipe.load_lokr(lycoris_file("sdxl", "lokr").path, "good")
            pipe.load_loha(bad)
    assert [(a["name"], a["strength"]["unet"]) for a in pipe.lycoris_adapters()] == [("kept", 0.5)]
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())
    pipe.unload_lycoris("kept")  # the registry is consistent: unloading gives the originals back
    fresh = make_pipe("sdxl", tmp_path)
    assert all(torch.equal(snapshot(fresh)[k], v) for k, v in snapshot(pipe).items())


def test_originals_beside_the_weights_are_kept_without_a_copy(lycoris_file, tmp_path):
    pipe = make_pipe("sdxl", tmp_path, torch.float16)
    layout = pipeline_layout(pipe)
    params = {key: t.layer.weight for key, t in layout.targets.items()}
    pointers = {key: p.data_ptr() for key, p in params.items()}
    values = {key: p.detach().clone() for key, p in params.items()}
    pipe.load_loha(lycoris_file("sdxl", "loha_tucker").path)
    patcher = pipe._lohakr_patcher
    assert len(patcher.originals)
    for key, kept in patcher.originals.items():
        assert kept.weight.data_ptr() == pointers[key]  # the original storage itself, not a copy
        assert params[key].data_ptr() != pointers[key]  # the layer got new storage for the patch
        assert layout.targets[key].layer.weight is params[key]  # same Parameter object
    pipe.set_lycoris_strength(pipe.lycoris_adapters()[0]["name"], 0.3)
    pipe.unload_lycoris()
    for key, p in params.items():
        assert layout.targets[key].layer.weight is p
        assert p.data_ptr() == pointers[key] and torch.equal(p, values[key])
    assert patcher.kept_bytes == 0


def test_unload_after_the_model_moved_copies_back_exactly(lycoris_file, tmp_path):
    pipe = make_pipe("sdxl", tmp_path, torch.float16)
    before = snapshot(pipe)
    pipe.load_lokr(lycoris_file("sdxl", "lokr_tucker").path)
    for component in COMPONENTS:  # what .to(device) does: every parameter gets new storage
        for p in getattr(pipe, component).parameters():
            p.data = p.data.clone()
    pipe.set_lycoris_strength(pipe.lycoris_adapters()[0]["name"], 0.5)
    pipe.unet.to(torch.float32)  # a dtype change: the originals no longer fit, they are copied in
    pipe.unload_lycoris()
    after = snapshot(pipe)
    assert all(after[k].dtype == (torch.float32 if k.startswith("unet.") else torch.float16) for k in after)
    assert all(torch.equal(before[k].to(after[k].dtype), after[k]) for k in before)


def test_auto_keeps_originals_on_a_gpu_only_with_room_to_spare(monkeypatch):
    from types import SimpleNamespace

    from lohakr.loaders import originals

    gib = 1 << 30
    gpu, cpu = torch.device("cuda:0"), torch.device("cpu")
    weights = [SimpleNamespace(device=gpu, numel=lambda: gib, element_size=lambda: 2),  # 2 GiB
               SimpleNamespace(device=cpu, numel=lambda: 10, element_size=lambda: 4)]
    memory = {"free": 0, "total": 80 * gib, "reserved": 0, "allocated": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (memory["free"], memory["total"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: memory["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: memory["allocated"])
    memory["free"] = 40 * gib  # 38 GiB left after keeping them: room
    assert originals.originals_placement("auto", weights) == {gpu: gpu, cpu: cpu}
    memory["free"] = 17 * gib  # 15 GiB left < a fifth of 80 GiB
    assert originals.originals_placement("auto", weights)[gpu] == cpu
    memory["reserved"], memory["allocated"] = 10 * gib, 4 * gib  # the allocator's cached blocks count as free
    assert originals.originals_placement("auto", weights)[gpu] == gpu
    memory.update(free=5 * gib, total=12 * gib, reserved=0, allocated=0)  # 3 GiB left < 4 GiB
    assert originals.originals_placement("auto", weights)[gpu] == cpu
    assert originals.originals_placement("cpu", weights) == {gpu: cpu, cpu: cpu}
    assert originals.originals_placement(None, weights) == {gpu: gpu, cpu: cpu}


def test_fuse_adds_in_place_keeping_nothing_and_refuses_changes(lycoris_file, tmp_path):
    from lohakr import FusedAdapterError

    fx = lycoris_file("sdxl", "loha_tucker")
    reversible = make_pipe("sdxl", tmp_path, torch.float16)
    fused = lohakr.enable(make_pipe("sdxl", tmp_path, torch.float16), fuse=True)
    layout = pipeline_layout(fused)
    pointers = {key: t.layer.weight.data_ptr() for key, t in layout.targets.items()}
    reversible.load_loha(fx.path, "x", strength=0.7, block_weights="IN04=0")
    fused.load_loha(fx.path, "x", strength=0.7, block_weights="IN04=0")
    _, w1 = layer_weights(reversible)
    _, w2 = layer_weights(fused)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # one adapter: the same single rounding
    assert fused._lohakr_patcher.kept_bytes == 0
    assert all(t.layer.weight.data_ptr() == pointers[key] for key, t in layout.targets.items())  # in place
    assert fused.lycoris_adapters()[0]["fused"] is True
    with pytest.raises(FusedAdapterError, match="reload the model"):
        fused.set_lycoris_strength("x", 0.1)
    with pytest.raises(FusedAdapterError, match="unload"):
        fused.unload_lycoris()
    _, after = layer_weights(fused)
    assert all(torch.equal(w2[k], after[k]) for k in w2)
    assert fused.lycoris_adapters()[0]["strength"]["unet"] == 0.7
    fused.load_lokr(lycoris_file("sdxl", "lokr_f4").path, "y")  # stacking adds onto the fused weights
    reversible.load_lokr(lycoris_file("sdxl", "lokr_f4").path, "y")
    _, w1 = layer_weights(reversible)
    _, w2 = layer_weights(fused)
    eps = torch.finfo(torch.float16).eps
    for key in w1:  # the fused stack rounds once more, after the first load: about an ulp of that
        a, b, first = w1[key].float(), w2[key].float(), after[key].float()
        bad = (a - b).abs() > eps * torch.maximum(a.abs(), first.abs()) + 1e-7
        assert not bool(bad.any()), (key, a[bad][:5], b[bad][:5])


def test_fuse_failing_midway_says_to_reload(lycoris_file, tmp_path, monkeypatch):
    from lohakr import FusedPartlyError
    from lohakr.loaders import apply

    pipe = lohakr.enable(make_pipe("sdxl", tmp_path), fuse=True)
    calls = {"n": 0}
    original = apply.patch

    def fails_later(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(apply, "patch", fails_later)
    with pytest.raises(FusedPartlyError, match="reload the model"):
        pipe.load_loha(lycoris_file("sdxl", "loha").path)
    assert pipe.lycoris_adapters() == []


@pytest.mark.parametrize("fuse", [False, True])
def test_weights_on_the_meta_device_are_refused_untouched(lycoris_file, tmp_path, fuse):
    pipe = lohakr.enable(make_pipe("sdxl", tmp_path), fuse=fuse)
    before = {k: v for k, v in snapshot(pipe).items() if k.startswith("text_encoder")}
    pipe.unet.to_empty(device="meta")  # what sequential CPU offload leaves behind
    with pytest.raises(ValueError, match="meta device"):
        pipe.load_loha(lycoris_file("sdxl", "loha").path)
    assert pipe.lycoris_adapters() == []
    after = snapshot(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_enable_again_keeps_loaded_adapters_and_refuses_other_settings(lycoris_file, tmp_path):
    pipe = make_pipe("sdxl", tmp_path)
    pipe.load_loha(lycoris_file("sdxl", "loha").path, "x")
    lohakr.enable(pipe)  # same settings (a re-run notebook cell): nothing changes
    assert [a["name"] for a in pipe.lycoris_adapters()] == ["x"]
    with pytest.raises(LohakrError, match="unload them first"):
        lohakr.enable(pipe, fuse=True)
    pipe.unload_lycoris()
    lohakr.enable(pipe, fuse=True)
    pipe.load_loha(lycoris_file("sdxl", "loha").path, "y")
    assert pipe.lycoris_adapters()[0]["fused"] is True


def test_a_load_takes_every_new_weight_storage_before_any_working_buffer(lycoris_file, tmp_path, monkeypatch):
    """A reversible load allocates the new storage of every weight it patches first, then works
    layer by layer: long-lived weights allocated between the layers' freed buffers would pin those
    heap pages (full-SDXL LoHa: 150-230 MiB more resident memory)."""
    from lohakr.loaders import apply

    pipe = make_pipe("sdxl", tmp_path)
    _, before = layer_weights(pipe)
    events = []  # ("storage", data_ptr) and ("layer", None), in order
    real_empty_like, real_write = torch.empty_like, apply.patch

    def empty_like(*args, **kwargs):
        tensor = real_empty_like(*args, **kwargs)
        events.append(("storage", tensor.data_ptr()))
        return tensor

    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(apply, "patch", lambda *a: (events.append(("layer", None)), real_write(*a))[1])
    pipe.load_loha(lycoris_file("sdxl", "loha").path, "a")
    monkeypatch.undo()
    layout, after = layer_weights(pipe)
    patched = [key for key in after if not torch.equal(after[key], before[key])]
    first_layer = events.index(("layer", None))
    allocated_at = {ptr: i for i, (kind, ptr) in enumerate(events) if kind == "storage"}
    assert len(patched) > 10
    for key in patched:
        assert allocated_at[layout.targets[key].layer.weight.data_ptr()] < first_layer, key


def test_a_strength_dict_changes_only_the_components_it_names_and_says_so(lycoris_file, tmp_path, caplog):
    pipe = make_pipe("sdxl", tmp_path)
    path = lycoris_file("sdxl", "lokr").path
    pipe.load_lokr(path, "char", strength={"unet": 1.0, "text_encoder": 0.5, "text_encoder_2": 0.0})
    with caplog.at_level(logging.INFO, logger="lohakr"):
        pipe.set_lycoris_strength("char", {"unet": 0.6})
    assert pipe.lycoris_adapters()[0].strength == {"unet": 0.6, "text_encoder": 0.5, "text_encoder_2": 0.0}
    assert "char: strength unet 1 → 0.6" in caplog.text and "text_encoder" not in caplog.text.split("strength")[-1]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lohakr"):
        pipe.set_lycoris_strength("char", 0.8)  # a number: every component
    assert pipe.lycoris_adapters()[0].strength == {"unet": 0.8, "text_encoder": 0.8, "text_encoder_2": 0.8}
    assert "unet 0.6 → 0.8, text_encoder 0.5 → 0.8, text_encoder_2 0 → 0.8" in caplog.text


def test_loaded_adapters_print_in_one_line_each_with_the_report_one_attribute_away(lycoris_file, tmp_path):
    pipe = make_pipe("sdxl", tmp_path)
    pipe.load_loha(lycoris_file("sdxl", "loha").path, "style", strength=0.7, block_weights="OUT=0")
    pipe.load_lokr(lycoris_file("sdxl", "lokr").path, "char")
    adapters = pipe.lycoris_adapters()
    text = "\n".join(str(a) for a in adapters)
    assert len(text.splitlines()) == 2 and len(repr(adapters)) < 1000
    assert str(adapters[0]).startswith("style: LoHa, ") and "block weights OUT=0" in str(adapters[0])
    char = adapters[1]
    assert char.report.complete and char["applied"] == char.modules == len(char.report.outcomes)
