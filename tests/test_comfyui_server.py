"""End to end: the real ComfyUI server with our pack in custom_nodes imports it cleanly, lists our
nodes, and runs a graph that loads an adapter and samples with it; the weights it patched equal
what the diffusers side patches from the same file."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_support import comfy_key, diffusers_twin, require_comfyui

require_comfyui()

from comfy_server import comfy_server  # noqa: E402

NODE_IDS = {"LohakrLoader", "LohakrLoaderModelOnly", "LohakrStack", "LohakrApplyStack", "LohakrSaveLora", "LohakrInfo"}


def graph(lora: str, strength: float, dump: str, latent: str) -> dict:
    return {
        "1": {"class_type": "LohakrTestTinySDXL", "inputs": {"seed": 0}},
        "2": {"class_type": "LohakrLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                       "strength_model": strength, "strength_clip": strength,
                                                       "block_weights": ""}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a lighthouse"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 3, "cfg": 2.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "LohakrTestLatentStats", "inputs": {"samples": ["6", 0], "path": latent}},
        "8": {"class_type": "LohakrTestWeightDump", "inputs": {"model": ["2", 0], "clip": ["2", 1], "path": dump}},
    }


@pytest.fixture(scope="module", params=["current", "classic"])
def server(request, tmp_path_factory):
    """The pack under ComfyUI's current node API, and forced onto the classic one."""
    import sys

    sys.path.insert(0, str(require_comfyui()))
    base = tmp_path_factory.mktemp("comfy")
    loras = base / "loras"
    loras.mkdir()
    from comfy_support import import_comfy
    from test_comfyui_nodes import make_file

    import_comfy()
    make_file(loras, "loha_tucker", "e2e_loha")
    env = {"LOHAKR_COMFY_API": "classic"} if request.param == "classic" else {}
    with comfy_server(base, loras, env=env) as running:
        yield running, base, loras


def test_pack_imports_cleanly_and_lists_nodes(server):
    running, _, _ = server
    info = running.get("/object_info")
    assert NODE_IDS <= set(info)
    loader = info["LohakrLoader"]
    assert loader["category"] == "loaders/lohakr" and "LoHa" in loader["display_name"]
    combo = loader["input"]["required"]["lora_name"]
    options = combo[0] if isinstance(combo[0], list) else combo[1]["options"]  # classic / current API
    assert "e2e_loha.safetensors" in options
    assert loader["input"]["optional"]["clip"][1]["tooltip"]
    log = running.log.read_text()
    assert "IMPORT FAILED" not in log and "lohakr-pack" in log
    assert "Traceback" not in log


def test_graph_samples_with_the_adapter_and_matches_diffusers(server):
    from safetensors.torch import load_file

    running, base, loras = server
    results = {}
    for strength in (0.0, 1.0):
        dump, latent = base / f"weights_{strength}.safetensors", base / f"latent_{strength}.safetensors"
        history = running.run(graph("e2e_loha.safetensors", strength, str(dump), str(latent)))
        assert history["status"]["status_str"] == "success", history["status"]
        results[strength] = (load_file(str(dump)), load_file(str(latent))["latent"], history["outputs"])
    report_text = results[1.0][2]["2"]["text"][0]
    assert "modules applied" in report_text and "not applied" not in report_text
    assert "lohakr_report" in results[1.0][2]["2"]
    assert not torch.equal(results[0.0][1], results[1.0][1])  # the adapter changes what is sampled
    assert float((results[0.0][1] - results[1.0][1]).abs().max()) > 1e-3

    # The diffusers side, from the same file, on the same original weights.
    from lohakr import WeightPatcher, load_adapter, resolve
    from lohakr.loaders.names import ModelLayout, SgmNames
    from lohakr.loaders.patcher import PatchedAdapter

    original = results[0.0][0]
    unet_state = {k: v for k, v in original.items() if not k.startswith("clip:")}
    clip_state = {k[len("clip:"):]: v for k, v in original.items() if k.startswith("clip:")}
    unet, te1, te2 = diffusers_twin(unet_state, clip_state)
    matches, report = resolve(load_adapter(loras / "e2e_loha.safetensors"),
                              ModelLayout.from_diffusers(unet, te1, te2), strict=True)
    WeightPatcher().add(PatchedAdapter("x", matches, report))
    sgm = SgmNames(unet)
    patched = results[1.0][0]
    for m in matches:
        key = comfy_key(m.target, sgm)
        ours = m.target.layer.weight.detach()
        err = float((patched[key] - ours).abs().max())
        assert err <= 1e-5 * float(ours.abs().max()), (key, err)
        assert not torch.equal(patched[key], original[key])


def test_info_route_refuses_a_model_checkpoint_with_422(server):
    """A checkpoint in the loras folder: 422 and the message the card shows, not a card of warnings."""
    from safetensors.torch import save_file

    running, _, loras = server
    save_file({"model.diffusion_model.out.2.weight": torch.ones(4, 4),
               "model.diffusion_model.out.2.bias": torch.ones(4)}, str(loras / "a_checkpoint.safetensors"))
    status, body = running.get_raw("/lohakr/info?name=a_checkpoint.safetensors")
    assert status == 422
    assert "this is a model checkpoint, not an adapter" in json.loads(body)["error"]
