"""PEFT's LoHa/LoKr files keep alpha and r in adapter_config.json: read from there, checked against
PEFT's own merge (the oracle), and never guessed silently."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from test_diffusers import make_pipe

from lohakr import load_adapter
from lohakr.loaders.describe import describe_adapter, format_description
from lohakr.loaders.errors import AdapterFormatError

TARGETS = ["to_q", "to_k", "to_v", "proj_in", "conv1"]


def peft_files(kind: str, unet, directory, **config):
    """A real PEFT adapter on ``unet`` (random factors), saved by PEFT: the weights file, and the
    UNet as PEFT merges it."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    config_class = LoHaConfig if kind == "loha" else LoKrConfig
    model = get_peft_model(copy.deepcopy(unet), config_class(target_modules=TARGETS, **config))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hada_" in name or ".lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(directory)
    return directory / "adapter_model.safetensors", model.merge_and_unload()


CASES = {
    "loha with patterns": ("loha", dict(r=4, alpha=8, rank_pattern={"attn1.to_q": 2}, alpha_pattern={"to_k": 3})),
    "loha tucker convs": ("loha", dict(r=4, alpha=2, use_effective_conv2d=True)),
    "lokr low-rank w2": ("lokr", dict(r=4, alpha=8)),
    # PEFT scales α/r here too (docs/format.md#peft-alpha-and-r)
    "lokr all factors full": ("lokr", dict(r=64, alpha=8)),
}


@pytest.mark.parametrize("case", CASES)
def test_a_peft_file_patches_what_peft_merges(case, tmp_path):
    kind, config = CASES[case]
    pipe = make_pipe("sd15", tmp_path)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path, merged = peft_files(kind, pipe.unet, tmp_path / "peft", **config)
    report = pipe.load_lycoris(str(path), "peft")
    assert report.applied and not report.not_applied
    expected, got = merged.state_dict(), pipe.unet.state_dict()
    changed = [k for k in base if not torch.equal(expected[k], base[k])]
    assert changed, "PEFT's merge changed nothing: the case tests nothing"
    eps = torch.finfo(torch.float32).eps
    for key in base:  # both merge in float32: ΔW to 1e-5, plus the rounding of W + ΔW
        delta = expected[key] - base[key]
        tolerance = 1e-5 * float(delta.abs().max()) + 2 * eps * float(base[key].abs().max())
        assert float((got[key] - expected[key]).abs().max()) <= tolerance, key

    adapter = load_adapter(path)
    assert "adapter_config.json" in adapter.scale_source
    assert adapter.scale_source in format_description(describe_adapter(adapter))  # `lohakr info` says so
    scales = {name.removeprefix("base_model.model."): m.scale for name, m in adapter.modules.items()}
    for name, scale in scales.items():  # the patterns above, as PEFT reads them
        rank = 2 if config.get("rank_pattern") and name.endswith("attn1.to_q") else config["r"]
        alpha = 3 if config.get("alpha_pattern") and name.endswith("to_k") else config["alpha"]
        assert scale == alpha / rank, name


def test_without_its_config_the_scale_is_unknown_and_said(tmp_path):
    pipe = make_pipe("sd15", tmp_path)
    path, _ = peft_files("loha", pipe.unet, tmp_path / "peft", r=4, alpha=8)
    alone = tmp_path / "alone" / "my_loha.safetensors"
    alone.parent.mkdir()
    shutil.copy(path, alone)
    with pytest.warns(UserWarning, match="no adapter_config.json beside the file"):
        adapter = load_adapter(alone)
    assert any("scale" in w and "unknown" in w for w in adapter.warnings)
    assert {m.scale for m in adapter.modules.values()} == {1.0}
    # The config can be given explicitly, as a path or a dict.
    given = load_adapter(alone, peft_config=path.with_name("adapter_config.json"))
    assert {m.scale for m in given.modules.values()} == {2.0}
    as_dict = json.loads(path.with_name("adapter_config.json").read_text())
    assert {m.scale for m in load_adapter(alone, peft_config=as_dict).modules.values()} == {2.0}


def test_a_config_of_other_weights_is_refused(tmp_path):
    pipe = make_pipe("sd15", tmp_path)
    path, _ = peft_files("loha", pipe.unet, tmp_path / "peft", r=4, alpha=8)
    config_path = path.with_name("adapter_config.json")
    config = json.loads(config_path.read_text())
    with pytest.raises(AdapterFormatError, match="rank 4.*belongs to other weights"):
        load_adapter(path, peft_config={**config, "r": 8})
    with pytest.raises(AdapterFormatError, match="peft_type is 'LORA'"):
        load_adapter(path, peft_config={**config, "peft_type": "LORA"})
    with pytest.raises(AdapterFormatError, match="says LOKR but module .* holds loha"):
        load_adapter(path, peft_config={**config, "peft_type": "LOKR"})
    config_path.write_text("{not json")
    with pytest.raises(AdapterFormatError, match="cannot read the PEFT config"):
        load_adapter(path)


def test_a_kohya_file_beside_a_peft_config_keeps_its_own_alpha(tmp_path):
    """A loras folder may hold some PEFT adapter's config: kohya/LyCORIS files never read it."""
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "r": 1, "alpha": 100}))
    g = torch.Generator().manual_seed(1)
    kohya = folder / "kohya_loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.randn(4, 2, generator=g),
               "lora_unet_x.hada_w1_b": torch.randn(2, 6, generator=g),
               "lora_unet_x.hada_w2_a": torch.randn(4, 2, generator=g),
               "lora_unet_x.hada_w2_b": torch.randn(2, 6, generator=g),
               "lora_unet_x.alpha": torch.tensor(1.0)}, str(kohya))
    adapter = load_adapter(kohya)
    assert adapter.modules["lora_unet_x"].scale == 0.5 and not adapter.scale_source
