"""Exact LoRA factors of every LoHa/LoKr variant (docs/format.md#conversion-to-lora): ``up @ down``
equals the module's ΔW within 1e-6 relative, on real LyCORIS files, at the rank ``exact_rank`` says."""

from __future__ import annotations

import pytest
import torch
from lycoris_oracle import VARIANTS
from test_spec_vectors import TV1, TV4, pat

from lohakr import LohakrError, load_adapter
from lohakr.loaders.convert import exact_lora, exact_rank

PLAIN = sorted(v for v in VARIANTS if "dora" not in v)


@pytest.mark.parametrize("variant", PLAIN)
def test_exact_lora_equals_the_update_of_every_variant(lycoris_file, variant):
    adapter = load_adapter(lycoris_file("sdxl", variant).path)
    assert adapter.modules
    for name, module in adapter.modules.items():
        shape = module.weight_shape
        factors = exact_lora(module)
        expected = module.delta(shape)
        error = float((factors.delta(shape) - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
        assert error <= 1e-6, (name, error)
        assert factors.rank == exact_rank(module), name


def test_loha_rank_is_the_product_of_the_branch_ranks_and_lokr_of_the_factor_ranks():
    loha = load_adapter({f"m.{k}": v for k, v in TV1.items()}).modules["m"]
    assert exact_rank(loha) == 2 * 2 and torch.equal(exact_lora(loha).delta((4, 6)), loha.delta((4, 6)))
    lokr = load_adapter({f"m.{k}": v for k, v in TV4.items()} | {"m.alpha": torch.tensor(0.5)}).modules["m"]
    assert exact_rank(lokr) == 2 * 1  # full 2×2 w1 (rank 2) ⊗ rank-1 w2
    assert torch.allclose(exact_lora(lokr).delta((4, 6)), lokr.delta((4, 6)), rtol=0, atol=1e-7)


def test_dora_has_no_exact_lora(lycoris_file):
    adapter = load_adapter(lycoris_file("sdxl", "lokr_dora_out").path)
    module = next(m for m in adapter.modules.values() if m.dora)
    with pytest.raises(LohakrError, match="DoRA rescales by the patched weight's norms"):
        exact_lora(module)


def test_locon_with_a_tucker_mid_and_a_full_diff():
    up, down, mid = pat((5, 2, 1, 1), 1), pat((3, 4, 1, 1), 2), pat((2, 3, 3, 3), 3)
    locon = load_adapter({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.lora_mid.weight": mid,
                          "m.alpha": torch.tensor(3.0)}).modules["m"]
    assert torch.allclose(exact_lora(locon).delta((5, 4, 3, 3)), locon.delta((5, 4, 3, 3)), rtol=0, atol=1e-6)
    diff = load_adapter({"m.diff": pat((4, 6), 4)}).modules["m"]
    assert exact_rank(diff) == 4 and torch.equal(exact_lora(diff).delta((4, 6)), diff.delta((4, 6)))


def relative_error(conversion, module):
    shape = module.weight_shape
    delta = module.delta(shape)
    return float((conversion.factors.delta(shape) - delta).norm() / delta.norm())


@pytest.mark.parametrize("max_error", [1e-1, 1e-2, 1e-3])
def test_svd_at_a_requested_error_stays_within_it_and_reports_it(lycoris_file, max_error):
    from lohakr.loaders.convert import to_lora

    adapter = load_adapter(lycoris_file("sdxl", "loha").path)  # rank-4 branches: exact rank 16
    for name, module in list(adapter.modules.items())[:40]:
        conversion = to_lora(module, rank=64, max_error=max_error)
        actual = relative_error(conversion, module)
        assert conversion.method == "svd" and actual <= max_error * (1 + 1e-3) + 1e-6, (name, actual)
        assert abs(actual - conversion.error) <= 1e-4 + 1e-3 * conversion.error, (name, actual, conversion.error)
        assert conversion.rank <= exact_rank(module)


def test_rank_chooses_between_exact_and_svd(lycoris_file):
    from lohakr.loaders.convert import to_lora

    module = next(iter(load_adapter(lycoris_file("sdxl", "loha").path).modules.values()))
    assert exact_rank(module) == 16
    assert to_lora(module, rank=16).method == "exact" and to_lora(module).method == "exact"
    low = to_lora(module, rank=3)
    assert low.method == "svd" and low.rank == 3 and low.error == pytest.approx(relative_error(low, module), abs=1e-4)
    with pytest.raises(LohakrError, match="a rank is a positive integer"):
        to_lora(module, rank=0)


# -- files -------------------------------------------------------------------------------------------
def converted_file(fx_path, tmp_path, family, **options):
    from safetensors.torch import save_file
    from test_diffusers import make_pipe

    from lohakr.loaders.convert import convert_adapter
    from lohakr.loaders.reference_models import reference_layout  # noqa: F401  (the CLI's layouts)

    pipe = make_pipe(family, tmp_path)
    from lohakr.loaders.diffusers_pipeline import pipeline_layout

    conversion = convert_adapter(load_adapter(fx_path), pipeline_layout(pipe), **options)
    out = tmp_path / "converted.safetensors"
    save_file(conversion.tensors, str(out), conversion.metadata)
    return out, conversion


@pytest.mark.parametrize("family, variant", [("sdxl", "loha"), ("sdxl", "loha_tucker"), ("sdxl", "lokr_tucker"),
                                             ("sdxl", "lokr_f4"), ("sd1", "loha_convdim"), ("sd1", "lokr_full")])
def test_a_converted_file_loads_in_diffusers_to_our_weights(lycoris_file, tmp_path, family, variant):
    """diffusers' own ``load_lora_weights`` + ``fuse_lora`` of the exact conversion gives the weights
    our loader gives from the LoHa/LoKr file (float32; convs as LoCon; both text encoders)."""
    from test_diffusers import make_pipe, snapshot

    fx = lycoris_file(family, variant, naming="kohya" if family == "sdxl" else "diffusers")
    out, conversion = converted_file(fx.path, tmp_path, family, dtype="fp32")
    assert conversion.max_error <= 1e-5 and {m.method for m in conversion.modules} == {"exact"}
    ours = make_pipe(family, tmp_path)
    ours.load_lycoris(fx.path)
    theirs = make_pipe(family, tmp_path)
    theirs.load_lora_weights(str(out))
    theirs.fuse_lora(lora_scale=1.0)
    theirs.unload_lora_weights()
    a, b = snapshot(ours), snapshot(theirs)
    for key, value in a.items():
        if key in b and value.is_floating_point():
            assert torch.allclose(value, b[key], rtol=1e-5, atol=1e-6), key


def test_the_command_line_writes_a_report_and_never_overwrites_its_input(tmp_path, capsys):
    import json

    from safetensors import safe_open
    from test_cli import make_file  # 4 LoHa and 1 LoKr modules on full-size SDXL layers, 1 that matches none

    from lohakr.loaders.cli import main

    source = make_file(tmp_path)
    out = tmp_path / "lora.safetensors"
    assert main(["convert", str(source), "--rank", "2", "--max-error", "0.5", "--dtype", "fp32", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"-> {out} (kohya LoRA, sdxl)" in text and "relative error (Frobenius, per module): max" in text
    assert "1 module(s) not converted" in text and "attn1_to_nothing [unmatched]" in text
    with safe_open(str(out), "pt") as f:
        report = json.loads(f.metadata()["lohakr_conversion"])
        assert f.metadata()["ss_network_module"] == "networks.lora"
    assert len(report["source_sha256"]) == 64 and report["modules"]
    assert all(m["rank"] <= 2 and (m["method"] == "exact" or m["error"] > 0) for m in report["modules"].values())
    assert main(["convert", str(source), "-o", str(source)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert not list(tmp_path.glob("tmp*.safetensors"))  # the temporary file is gone


@pytest.mark.parametrize("variant", ["loha_dora_out", "lokr_dora_in"])
def test_a_dora_file_keeps_its_magnitude_beside_exact_factors(lycoris_file, tmp_path, variant):
    """docs/format.md#dora-in-a-lora: each DoRA module becomes its exact LoRA plus its ``dora_scale``;
    loaded (as ComfyUI and lohakr read LoRA + dora_scale), the weights are the source's."""
    from test_diffusers import make_pipe

    source = lycoris_file("sdxl", variant).path
    out, conversion = converted_file(source, tmp_path, "sdxl")
    assert sum(k.endswith(".dora_scale") for k in conversion.tensors) == sum(
        m.dora for m in load_adapter(source).modules.values()) > 0
    assert {m.method for m in conversion.modules} == {"exact + DoRA magnitude"} and conversion.notes
    ours, theirs = make_pipe("sdxl", tmp_path), make_pipe("sdxl", tmp_path)
    ours.load_lycoris(source)
    theirs.load_lycoris(out)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        expected, got = getattr(ours, component).state_dict(), getattr(theirs, component).state_dict()
        for key in expected:
            assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-6), key


def test_dora_in_a_stack_is_baked_through_the_base_weights(lycoris_file, tmp_path):
    """A DoRA adapter merged at strength 0.5 beside another: its layers are the SVD of what the stack
    does to the base weights (exact rank: within float32 rounding); the merged LoRA at strength 1
    gives the stack's weights. Without base weights (the command line's reference layouts) it is refused."""
    from test_diffusers import make_pipe

    from lohakr.loaders.convert import merge_adapters
    from lohakr.loaders.diffusers_pipeline import pipeline_layout
    from lohakr.loaders.names import ModelLayout

    plain, dora = lycoris_file("sdxl", "loha").path, lycoris_file("sdxl", "lokr_dora_out").path
    stack = [(load_adapter(plain), 1.0), (load_adapter(dora), 0.5)]
    layout = pipeline_layout(make_pipe("sdxl", tmp_path))
    with pytest.raises(LohakrError, match="no base weights were given"):
        merge_adapters(stack, ModelLayout.from_table(layout.to_table()))  # the same layers, no weights
    merged = merge_adapters(stack, layout, dtype="fp32")
    assert "baked" in {m.method for m in merged.modules} and merged.max_error <= 1e-5
    out = merged.write(str(tmp_path / "merged.safetensors"), [])
    live, loaded = make_pipe("sdxl", tmp_path), make_pipe("sdxl", tmp_path)
    live.load_lycoris(plain, strength=1.0)
    live.load_lycoris(dora, strength=0.5)
    loaded.load_lycoris(out)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        expected, got = getattr(live, component).state_dict(), getattr(loaded, component).state_dict()
        for key in expected:
            assert torch.allclose(got[key], expected[key], rtol=1e-5, atol=1e-5), key


# -- merge (docs/format.md#merging-adapters) ---------------------------------------------------------
def merged_stack(lycoris_file, tmp_path, **options):
    from safetensors.torch import save_file
    from test_diffusers import make_pipe

    from lohakr.loaders.convert import merge_adapters
    from lohakr.loaders.diffusers_pipeline import pipeline_layout

    files = [(lycoris_file("sdxl", "loha_tucker").path, 0.7), (lycoris_file("sdxl", "lokr_f4").path, -0.5),
             (lycoris_file("sdxl", "lokr_full").path, 1.2)]
    stack = make_pipe("sdxl", tmp_path)
    with stack.lycoris_batch():
        for path, strength in files:
            stack.load_lycoris(path, strength=strength)
    merged = merge_adapters([(load_adapter(p), s) for p, s in files], pipeline_layout(stack), dtype="fp32",
                            **options)
    out = tmp_path / "merged.safetensors"
    save_file(merged.tensors, str(out), merged.metadata)
    single = make_pipe("sdxl", tmp_path)
    single.load_lycoris(out)
    return stack, single, merged


def test_a_merge_of_three_adapters_loads_to_the_stack(lycoris_file, tmp_path):
    from test_diffusers import snapshot

    from lohakr.loaders.diffusers_pipeline import pipeline_layout

    stack, single, merged = merged_stack(lycoris_file, tmp_path)
    assert {m.method for m in merged.modules} == {"exact"} and merged.max_error <= 1e-5
    layout = pipeline_layout(stack)
    merged_layers = {line.module for line in merged.modules}
    assert len(merged_layers) == len(merged.modules)  # one module per layer, whatever touched it
    base = make_base_weights(tmp_path)
    a, b = snapshot(stack), snapshot(single)
    for key in layout.targets:
        weight = f"{key}.weight"
        delta = a[weight] - base[weight]
        err = float((b[weight] - a[weight]).abs().max())
        assert err <= 1e-5 * float(delta.abs().max()) + 1e-6, key


def make_base_weights(tmp_path):
    from test_diffusers import make_pipe, snapshot

    return snapshot(make_pipe("sdxl", tmp_path))


@pytest.mark.parametrize("max_error", [1e-1, 1e-2])
def test_a_merge_at_an_error_stays_within_it(lycoris_file, tmp_path, max_error):
    from test_diffusers import snapshot

    stack, single, merged = merged_stack(lycoris_file, tmp_path, rank=1000, max_error=max_error)
    assert "svd" in {m.method for m in merged.modules} and merged.max_error <= max_error
    base, a, b = make_base_weights(tmp_path), snapshot(stack), snapshot(single)
    for line in merged.modules:
        weight = f"{line.module}.weight"
        delta = a[weight] - base[weight]
        got = float((b[weight] - base[weight] - delta).norm() / delta.norm())
        assert got <= line.error * 1.01 + 1e-5, (line.module, got, line.error)


def test_merge_command_line(lycoris_file, tmp_path, capsys):
    from test_cli import make_file  # LoHa and LoKr modules on full-size SDXL layers

    from lohakr.loaders.cli import main as cli

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = make_file(tmp_path / "a"), make_file(tmp_path / "b")
    out = tmp_path / "m.safetensors"
    assert cli(["merge", f"{a}:0.5", f"{b}:-1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "load it at strength 1" in printed and "exact" in printed and out.exists()
    assert cli(["merge", f"{a}:0.5", str(b), "-o", str(b)]) == 2
    assert "would overwrite one of the inputs" in capsys.readouterr().err



@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_the_error_after_the_cast_stays_within_the_request(lycoris_file, tmp_path, dtype):
    """At ``max_error`` E the rank is chosen so that the error of what is stored (after the cast to
    fp16/bf16, which adds to the SVD's tail) is at most E, on every module that is cut."""
    from test_diffusers import make_pipe

    from lohakr.loaders.convert import convert_adapter
    from lohakr.loaders.diffusers_pipeline import pipeline_layout

    adapter = load_adapter(lycoris_file("sdxl", "loha").path)
    layout = pipeline_layout(make_pipe("sdxl", tmp_path))
    stored = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for error in (1e-2, 3e-3):
        conversion = convert_adapter(adapter, layout, rank="exact", max_error=error, dtype=dtype)
        cut = [m for m in conversion.modules if m.method == "svd"]
        assert cut and all(m.error <= error for m in cut), max(m.error for m in cut)
        # a module whose own rounding in fp16/bf16 is above E, at its full rank, is stored in fp32, and said
        dtypes = {m.name: conversion.tensors[f"{m.name}.lora_up.weight"].dtype for m in cut}
        widened = {name for name, kind in dtypes.items() if kind == torch.float32}
        assert all(kind == stored for name, kind in dtypes.items() if name not in widened)
        assert not widened or any("stored in fp32" in note for note in conversion.notes)
    assert dtype == "fp16" or widened  # bf16's rounding (about 3e-3) needs it at 3e-3
