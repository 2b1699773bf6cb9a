"""``lohakr bake`` on full-size fp16 SDXL (the diffusers folder first_load.py writes), against copying
the same weight files, one fresh process per measurement:

- ``copy (kernel)``: each weight file copied by ``shutil.copyfile`` (``copy_file_range``/``sendfile``);
- ``copy (read/write)``: the same bytes read into one reused 64 MiB buffer and written from it: the
  read/write pattern a bake has, without the patching.

Peak memory: the rise of the child's anonymous resident memory (``RssAnon``, sampled every 2 ms)
during the step, the imports done before it; file pages in the page cache are not counted. The
adapter's factors, parsed inside the step, are part of it (449 MB for the LoHa file).

    python benchmarks/bake_sdxl.py [--reps N] [--adapters LIST] [--single-file]

``--single-file``: the same into the SDXL single-file checkpoint (original SGM keys, bigG with its
fused ``in_proj``) written from that folder once, then ComfyUI (``COMFYUI_DIR``, run with
``COMFYUI_PYTHON``) loads a baked file with ``load_checkpoint_guess_config``, as its
CheckpointLoaderSimple does (no VAE in the file), and its weights are compared with the file's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OUT = HERE / ".cache" / "bake_out"
SINGLE = HERE / ".cache" / "sdxl_fp16_single.safetensors"
SINGLE_OUT = HERE / ".cache" / "bake_out.safetensors"
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors")


def prepare_single_file() -> Path:
    """The folder's UNet and text encoders as one single-file checkpoint in original keys, written once."""
    if SINGLE.is_file():
        return SINGLE
    import torch
    from diffusers import UNet2DConditionModel
    from first_load import MODEL_DIR
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lohakr.loaders.tiny_models import sgm_checkpoint_state

    parts = (UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet", dtype=torch.float16),
             CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder", dtype=torch.float16),
             CLIPTextModelWithProjection.from_pretrained(MODEL_DIR / "text_encoder_2", dtype=torch.float16))
    partial = SINGLE.with_suffix(".partial")
    save_file(sgm_checkpoint_state(*parts), str(partial))
    partial.replace(SINGLE)
    return SINGLE


def child(kind: str, adapter: str | None) -> dict:
    from first_load import MODEL_DIR, Step

    from lohakr.loaders.bake import bake, meta_components

    single = kind.endswith("-single")
    kind = kind.removesuffix("-single")
    meta_components(MODEL_DIR)  # the imports (diffusers, transformers) happen here, outside the step
    shutil.rmtree(OUT, ignore_errors=True)
    SINGLE_OUT.unlink(missing_ok=True)
    with Step() as step:
        if kind == "bake":
            result = bake(SINGLE if single else MODEL_DIR, [adapter], SINGLE_OUT if single else OUT)
        elif single:
            if kind == "copy-kernel":
                shutil.copyfile(SINGLE, SINGLE_OUT)
            else:
                buffer = memoryview(bytearray(64 << 20))
                with open(SINGLE, "rb") as reader, open(SINGLE_OUT, "wb") as writer:
                    while count := reader.readinto(buffer):
                        writer.write(buffer[:count])
        else:
            for name in WEIGHT_FILES:
                target = OUT / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if kind == "copy-kernel":
                    shutil.copyfile(MODEL_DIR / name, target)
                else:  # one reused buffer, as a bake reuses its own
                    buffer = memoryview(bytearray(64 << 20))
                    with open(MODEL_DIR / name, "rb") as reader, open(target, "wb") as writer:
                        while count := reader.readinto(buffer):
                            writer.write(buffer[:count])
    figures = {"kind": kind, "s": step.seconds, "peak_anon_bytes": step.peak - step.base}
    if kind == "bake":
        figures["patched"], figures["copied"] = result.patched, result.copied
    shutil.rmtree(OUT, ignore_errors=True)
    if not (single and kind == "bake" and os.environ.get("LOHAKR_KEEP_BAKED")):
        SINGLE_OUT.unlink(missing_ok=True)
    return figures


COMFY_CHECK = """
import sys, json, torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True
import comfy.sd, comfy.model_management
from safetensors import safe_open
model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(sys.argv[2], output_vae=False, output_clip=True)
comfy.model_management.load_models_gpu([model])
unet = model.model.state_dict()
te = clip.cond_stage_model.state_dict()
checked = differ = 0
with safe_open(sys.argv[2], "pt") as f:
    for key in f.keys():
        value = f.get_tensor(key)
        if key.startswith("model.diffusion_model."):
            theirs = unet.get(key[len("model."):])
        elif ".resblocks." in key and key.endswith("attn.in_proj_weight"):
            n, third = key.split(".resblocks.")[1].split(".")[0], value.shape[0] // 3
            base = f"clip_g.transformer.text_model.encoder.layers.{n}.self_attn."
            theirs = torch.cat([te[base + p + "_proj.weight"] for p in "qkv"])
        elif key.startswith("conditioner.embedders.0.transformer."):
            theirs = te.get("clip_l.transformer." + key.split(".transformer.", 1)[1])
        else:
            continue
        if theirs is None:
            continue
        checked += 1
        differ += not torch.equal(theirs.to(value.dtype), value)
print(json.dumps({"model": type(model.model).__name__, "checked": checked, "differ": differ}))
"""


def comfy_check(adapter: str) -> dict:
    """Bake ``adapter`` into the single file, then load it in ComfyUI and compare every weight."""
    comfy_dir, comfy_python = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON", sys.executable)
    if not comfy_dir:
        return {"skipped": "COMFYUI_DIR is not set"}
    env = {**os.environ, "LOHAKR_KEEP_BAKED": "1"}
    subprocess.run([sys.executable, __file__, "--child", "bake-single", adapter], check=True, env=env,
                   capture_output=True)
    done = subprocess.run([comfy_python, "-c", COMFY_CHECK, comfy_dir, str(SINGLE_OUT)], capture_output=True,
                          text=True, check=False)
    SINGLE_OUT.unlink(missing_ok=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": done.stderr[-1500:]}


def run(kind: str, adapter: str | None = None) -> dict:
    command = [sys.executable, __file__, "--child", kind, adapter or ""]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--adapters", default="loha_d32_tucker,lokr_f8,lokr_full_w2")
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--single-file", action="store_true", help="bake into the single-file checkpoint")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] or None)))
        return 0
    from first_load import prepare_model
    from patch_sdxl import ADAPTERS, make_adapter_file

    prepare_model()
    suffix = ""
    if args.single_file:
        prepare_single_file()
        suffix = "-single"
    paths = {name: str(make_adapter_file(name, ADAPTERS[name])) for name in args.adapters.split(",")}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.reps):  # interleaved, so a drifting machine slows all alike
        for kind in ("copy-kernel", "copy-rw"):
            runs.setdefault(kind, []).append(run(kind + suffix))
        for name, path in paths.items():
            runs.setdefault(f"bake {name}", []).append(run("bake" + suffix, path))
    copy_rw = statistics.median(r["s"] for r in runs["copy-rw"])
    copy_kernel = statistics.median(r["s"] for r in runs["copy-kernel"])
    for label, results in runs.items():
        seconds = statistics.median(r["s"] for r in results)
        peak = max(r["peak_anon_bytes"] for r in results) / 2**20
        extra = ""
        if label.startswith("bake"):
            extra = (f"  ({seconds / copy_rw:.2f}× the read/write copy, {seconds / copy_kernel:.2f}× the kernel copy; "
                     f"{results[0]['patched']} tensors patched, {results[0]['copied']} copied)")
        print(f"{label:24} {seconds:6.2f} s [{min(r['s'] for r in results):.2f}..{max(r['s'] for r in results):.2f}]"
              f"  peak anon +{peak:.0f} MiB{extra}")
    if args.single_file:
        print("ComfyUI load_checkpoint_guess_config of a baked file:", comfy_check(next(iter(paths.values()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
