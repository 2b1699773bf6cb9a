"""Bad input: each a clear error naming the file and module; nothing is patched."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file
from test_spec_vectors import TV1, TV4, pat

from lohakr import AdapterFormatError, AdapterShapeError, ModelLayout, load_adapter, resolve


def write(tmp_path, tensors, name="adapter.safetensors", metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def loha(name="lora_unet_x", **override):
    tensors = {f"{name}.{k}": v for k, v in TV1.items()}
    tensors[f"{name}.alpha"] = torch.tensor(1.0)
    tensors.update({f"{name}.{k}": v for k, v in override.items()})
    return tensors


def test_truncated_file(tmp_path):
    path = write(tmp_path, loha())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(AdapterFormatError, match=r"adapter\.safetensors.*(truncated|corrupt)"):
        load_adapter(path)


def test_truncated_header(tmp_path):
    path = write(tmp_path, loha())
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(AdapterFormatError, match=r"adapter\.safetensors: not a safetensors file"):
        load_adapter(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not an adapter at all")
    with pytest.raises(AdapterFormatError, match="notes.safetensors: not a safetensors file"):
        load_adapter(path)


@pytest.mark.parametrize("zipped", [True, False])
def test_pickle_is_refused_without_unpickling(tmp_path, zipped):
    path = tmp_path / "model.safetensors"
    if zipped:
        torch.save(loha(), path)
    else:
        path.write_bytes(pickle.dumps({"a": 1}, protocol=4))
    with pytest.raises(AdapterFormatError, match="pickled PyTorch checkpoint"):
        load_adapter(path)


def test_empty_file_and_file_without_tensors(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(AdapterFormatError, match="empty.safetensors: the file is empty"):
        load_adapter(empty)
    path = tmp_path / "none.safetensors"
    save_file({}, str(path))
    with pytest.raises(AdapterFormatError, match="none.safetensors: the file contains no tensors"):
        load_adapter(path)


def test_missing_file(tmp_path):
    with pytest.raises(AdapterFormatError, match="nothere.safetensors: cannot read"):
        load_adapter(tmp_path / "nothere.safetensors")


def test_missing_partner_key(tmp_path):
    tensors = loha()
    del tensors["lora_unet_x.hada_w1_b"]
    with pytest.raises(AdapterShapeError, match=r"adapter\.safetensors: module lora_unet_x: missing hada_w1_b"):
        load_adapter(write(tmp_path, tensors))
    with pytest.raises(AdapterShapeError, match="missing lokr_w2_b"):
        load_adapter({"m.lokr_w1": TV4["lokr_w1"], "m.lokr_w2_a": TV4["lokr_w2_a"]})
    with pytest.raises(AdapterShapeError, match="missing hada_t2"):
        load_adapter(loha(hada_t1=pat((2, 2, 3, 3), 1)))


def test_rank_mismatches(tmp_path):
    with pytest.raises(AdapterShapeError, match="module lora_unet_x: rank mismatch: hada_w1_a"):
        load_adapter(write(tmp_path, loha(hada_w1_a=pat((4, 3), 1))))
    with pytest.raises(AdapterShapeError, match="branch 1 has rank 2, branch 2 rank 3"):
        load_adapter(loha(hada_w2_a=pat((4, 3), 1), hada_w2_b=pat((3, 6), 1)))
    with pytest.raises(AdapterShapeError, match="rank mismatch: lokr_t2"):
        load_adapter({"m.lokr_w1": pat((2, 2), 1), "m.lokr_t2": pat((2, 2, 3, 3), 1),
                      "m.lokr_w2_a": pat((3, 4), 1), "m.lokr_w2_b": pat((2, 4), 1)})


def test_wrong_shape_for_the_layer_is_mismatched_not_patched():
    layer = torch.nn.Linear(5, 4)
    before = layer.weight.detach().clone()
    layout = ModelLayout(family="unknown", targets={})
    from lohakr.loaders.names import LayerTarget

    layout.register(LayerTarget("unet", "x", tuple(layer.weight.shape), "IN01", layer), ["lora_unet_x"])
    _, report = resolve(load_adapter({**loha(), **loha("lora_unet_y")}), layout, check_base_model=False)
    assert [o.status for o in report.outcomes] == ["mismatched", "unmatched"]
    assert "ΔW is (4, 6) but the layer weight is (4, 5)" in report.outcomes[0].reason
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factor_is_reported(tmp_path, bad):
    w = TV1["hada_w2_b"].clone()
    w[0, 3] = bad
    with pytest.raises(AdapterFormatError, match=r"module lora_unet_x: hada_w2_b contains 1 NaN/inf value"):
        load_adapter(write(tmp_path, loha(hada_w2_b=w)))


def test_non_finite_alpha_is_an_error_unless_ignored():
    with pytest.raises(AdapterFormatError, match="module lora_unet_x: alpha is inf"):
        load_adapter(loha(alpha=torch.tensor(float("inf"))))
    full = {"m.lokr_w1": pat((2, 2), 1), "m.lokr_w2": pat((2, 3), 2), "m.alpha": torch.tensor(float("inf"))}
    assert load_adapter(full).modules["m"].scale == 1


def test_alpha_with_several_values():
    with pytest.raises(AdapterFormatError, match="alpha has shape"):
        load_adapter(loha(alpha=torch.tensor([1.0, 2.0])))


def test_mixed_algorithms_in_one_module():
    with pytest.raises(AdapterFormatError, match="mixes LoHa and LoKr"):
        load_adapter({**loha("m"), "m.lokr_w1": pat((2, 2), 1)})


def test_tv_mixed_file_dispatch(tmp_path):
    """LoKr + LoRA + norm diff + bundled embedding + IA3 + full diff in one file."""
    tensors = {
        "lora_unet_a.lokr_w1": pat((2, 2), 1), "lora_unet_a.lokr_w2": pat((2, 3), 2),
        "lora_unet_a.alpha": torch.tensor(1.0),
        "lora_unet_b.lora_up.weight": pat((4, 2), 1), "lora_unet_b.lora_down.weight": pat((2, 6), 2),
        "lora_unet_b.alpha": torch.tensor(1.0),
        "lora_unet_c_norm.w_norm": pat((4,), 1), "lora_unet_c_norm.b_norm": pat((4,), 2),
        "bundle_emb.foo.string_to_param.*": pat((1, 8), 1),
        "lora_unet_d.weight": pat((4,), 3), "lora_unet_d.on_input": torch.tensor(1),
        "lora_unet_e.diff": pat((4, 6), 4), "lora_unet_e.diff_b": pat((4,), 5),
        "lora_unet_f.lokr_w1": pat((2, 2), 1), "lora_unet_f.lokr_w2": pat((2, 3), 2),
        "lora_unet_f.lokr_t1": pat((1,), 2),
    }
    adapter = load_adapter(write(tmp_path, tensors))
    assert {n: m.kind for n, m in adapter.modules.items()} == {
        "lora_unet_a": "lokr", "lora_unet_b": "lora", "lora_unet_e": "full", "lora_unet_f": "lokr"}
    assert adapter.skipped["lora_unet_c_norm"].startswith("unsupported algorithm: norm-layer diff")
    assert "IA3" in adapter.skipped["lora_unet_d"]
    assert "textual-inversion" in adapter.skipped["bundle_emb"]
    assert any("lokr_t1 is ignored" in w for w in adapter.warnings)
    lora = adapter.modules["lora_unet_b"]
    assert lora.scale == 0.5 and torch.equal(lora.delta((4, 6)), 0.5 * pat((4, 2), 1) @ pat((2, 6), 2))
    full = adapter.modules["lora_unet_e"]
    assert torch.equal(full.delta((4, 6)), pat((4, 6), 4)) and torch.equal(full.bias_delta(), pat((4,), 5))


def test_locon_tucker_mid():
    up, down, mid = pat((5, 2, 1, 1), 1), pat((3, 4, 1, 1), 2), pat((2, 3, 3, 3), 3)
    m = load_adapter({"m.lora_up.weight": up, "m.lora_down.weight": down, "m.lora_mid.weight": mid,
                      "m.alpha": torch.tensor(3.0)}).modules["m"]
    expected = torch.einsum("oa,ajyx,jc->ocyx", up.flatten(1), mid, down.flatten(1))
    assert m.rank == 3 and m.scale == 1 and torch.allclose(m.delta((5, 4, 3, 3)), expected, atol=1e-6)


def test_dotted_peft_names_split_before_the_suffix():
    adapter = load_adapter({"base_model.model.down_blocks.0.attentions.0.proj_in.hada_w1_a": TV1["hada_w1_a"],
                            "base_model.model.down_blocks.0.attentions.0.proj_in.hada_w1_b": TV1["hada_w1_b"],
                            "base_model.model.down_blocks.0.attentions.0.proj_in.hada_w2_a": TV1["hada_w2_a"],
                            "base_model.model.down_blocks.0.attentions.0.proj_in.hada_w2_b": TV1["hada_w2_b"]})
    assert list(adapter.modules) == ["base_model.model.down_blocks.0.attentions.0.proj_in"]


def test_loading_holds_factors_only_and_builds_no_delta(tmp_path, monkeypatch):
    from lohakr.loaders import rebuild

    calls = []
    for name in ("loha_product", "kron", "lora_product", "rebuild_tucker"):
        original = getattr(rebuild, name)
        monkeypatch.setattr(rebuild, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    tensors = {**loha(), "lora_unet_k.lokr_w1": pat((2, 2), 1), "lora_unet_k.lokr_w2": pat((2, 3), 2)}
    adapter = load_adapter(write(tmp_path, tensors))
    stored = sum(v.numel() * v.element_size() for k, v in tensors.items() if not k.endswith("alpha"))
    assert adapter.nbytes() == stored
    assert calls == []
    adapter.modules["lora_unet_x"].delta((4, 6))
    assert calls == ["loha_product"]


def peak_bytes(fn) -> int:
    """Peak CPU memory allocated by torch ops while ``fn`` runs (profiler allocation events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("tucker", [False, True])
def test_building_a_delta_holds_about_one_layer(tucker):
    """ΔW of a 1280×5120 LoHa (and a 640×640×3×3 Tucker LoHa) peaks near one layer's ΔW."""
    g = torch.Generator().manual_seed(0)
    r = 16
    if tucker:
        shape = (640, 640, 3, 3)
        tensors = {"m.hada_t1": torch.randn(r, r, 3, 3, generator=g),
                   "m.hada_t2": torch.randn(r, r, 3, 3, generator=g),
                   "m.hada_w1_a": torch.randn(r, 640, generator=g), "m.hada_w1_b": torch.randn(r, 640, generator=g),
                   "m.hada_w2_a": torch.randn(r, 640, generator=g), "m.hada_w2_b": torch.randn(r, 640, generator=g)}
    else:
        shape = (1280, 5120)
        tensors = {"m.hada_w1_a": torch.randn(1280, r, generator=g), "m.hada_w1_b": torch.randn(r, 5120, generator=g),
                   "m.hada_w2_a": torch.randn(1280, r, generator=g), "m.hada_w2_b": torch.randn(r, 5120, generator=g)}
    module = load_adapter(tensors).modules["m"]
    layer_bytes = torch.Size(shape).numel() * 4
    peak = peak_bytes(lambda: module.delta(shape))
    from lohakr.loaders.rebuild import CHUNK_ELEMENTS

    # The naive (w1_a@w1_b)*(w2_a@w2_b) holds three layer-sized tensors; we hold one plus chunks.
    assert layer_bytes <= peak <= layer_bytes + 3 * CHUNK_ELEMENTS * 4, peak / layer_bytes
    assert peak < 2 * layer_bytes


def test_adapter_cache_rereads_only_changed_files(tmp_path):
    import os

    from lohakr.loaders.adapter import AdapterCache

    cache = AdapterCache(capacity=2)
    path = write(tmp_path, loha())
    first = cache.load(path)
    assert cache.load(path) is first  # same path, size and mtime: not read again
    write(tmp_path, loha(alpha=torch.tensor(2.0)))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    second = cache.load(path)
    assert second is not first and second.modules["lora_unet_x"].alpha == 2.0
    for i in range(3):
        cache.load(write(tmp_path, loha(), name=f"other{i}.safetensors"))
    assert cache.load(path) is not second  # evicted beyond capacity
