"""``python -m lohakr info``: what a file is and how it covers SDXL / SD1.5, with no weights."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from lohakr.loaders.cli import main

METADATA = {
    "ss_network_module": "lycoris.kohya",
    "ss_network_dim": "16",
    "ss_network_alpha": "8",
    "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "8", "use_tucker": "True", "dropout": None}),
    "ss_tag_frequency": json.dumps({"10_cat": {"cat": 40, " orange cat": 12, "sitting": 3},
                                    "5_dog": {"cat": 2, "dog": 9}}),
    "ss_resolution": "(1024, 1024)",
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "modelspec.title": "my cat",
}


def loha(name, out_dim, in_dim, rank=4, alpha=2.0):
    g = torch.Generator().manual_seed(1)
    return {f"{name}.hada_w1_a": torch.randn(out_dim, rank, generator=g),
            f"{name}.hada_w1_b": torch.randn(rank, in_dim, generator=g),
            f"{name}.hada_w2_a": torch.randn(out_dim, rank, generator=g),
            f"{name}.hada_w2_b": torch.randn(rank, in_dim, generator=g),
            f"{name}.alpha": torch.tensor(alpha, dtype=torch.float16)}


def make_file(tmp_path):
    tensors = {}
    tensors.update(loha("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048))
    tensors.update(loha("lora_unet_output_blocks_2_2_conv", 1280, 1280 * 9))
    tensors.update(loha("lora_te2_text_model_encoder_layers_0_mlp_fc1", 5120, 1280, rank=8))
    tensors.update({"lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.lokr_w1": torch.randn(8, 8),
                    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.lokr_w2": torch.randn(160, 160),
                    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(100000.0).half()})
    tensors.update(loha("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_nothing", 640, 640))
    path = tmp_path / "mycat.safetensors"
    save_file(tensors, str(path), METADATA)
    return path


def test_info_text(tmp_path, capsys):
    path = make_file(tmp_path)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 LoHa, 1 LoKr" in out
    assert "SDXL (modelspec.architecture = stable-diffusion-xl-v1-base/lora)" in out
    assert "cat (42), dog (9), orange cat (12)" not in out and "top tags    cat (42), orange cat (12), dog (9)" in out
    assert "scales      0.25×1, 0.5×3, 1×1" in out
    assert "LoKr factor 8×1; full w2 in 1 modules" in out
    assert "use_tucker=True" in out and "(1024, 1024)" in out
    assert "coverage on sdxl: 4/5 modules apply" in out
    assert "attn1_to_nothing [unmatched]" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  IN04")
             or line.startswith("  OUT02") or line.startswith("  TE2") or line.startswith("  M00")}
    # columns: applied, unmatched, mismatched, unsupported, duplicate
    assert lines["IN04"] == ["1", "1", "0", "0", "0"] and lines["OUT02"] == ["1", "0", "0", "0", "0"]
    assert lines["TE2"] == ["1", "0", "0", "0", "0"] and lines["M00"] == ["1", "0", "0", "0", "0"]


def test_info_json_and_other_model(tmp_path, capsys):
    path = make_file(tmp_path)
    assert main(["info", str(path), "--json", "--model", "sd1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["adapter"]["algorithms"] == {"LoHa": 4, "LoKr": 1}
    assert data["coverage"]["model_family"] == "sd1"
    assert data["coverage"]["counts"]["applied"] == 1  # SD1.5's mid block also has 1280×1280 attn1.to_q
    assert data["coverage"]["warnings"][0] == "this is an SDXL adapter; the layout is SD1.5"


def test_info_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 4)
    result = subprocess.run([sys.executable, "-m", "lohakr", "info", str(bad)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "error:" in result.stderr and "broken.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_info_reads_no_torch_and_puts_warnings_first(tmp_path):
    """``info`` reads the header and the few values it needs (no torch import) and says first what
    changes the reading: here, an SDXL file shown on SD1.5."""
    path = make_file(tmp_path)
    code = ("import sys; from lohakr.loaders.cli import main; main(['info', sys.argv[1], '--model', 'sd1']); "
            "print('torch imported:', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "warning: this is an SDXL adapter; the layout is SD1.5"
    assert "applied: patches a layer of this model; unmatched: names no layer" in out
    assert out.rstrip().endswith("torch imported: False")


def test_info_from_the_header_equals_the_full_read(tmp_path):
    """What ``info`` shows from the header alone is what the full read (tensors) shows."""
    from lohakr import load_adapter
    from lohakr.loaders.describe import describe_adapter

    path = make_file(tmp_path)
    fast, full = describe_adapter(load_adapter(path, header_only=True)), describe_adapter(load_adapter(path))
    assert fast == full
