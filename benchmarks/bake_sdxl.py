"""``lohakr bake`` on full-size fp16 SDXL (the diffusers folder first_load.py writes), against copying
the same weight files, one fresh process per measurement:

- ``copy (kernel)``: each weight file copied by ``shutil.copyfile`` (``copy_file_range``/``sendfile``);
- ``copy (read/write)``: the same bytes read into one reused 64 MiB buffer and written from it: the
  read/write pattern a bake has, without the patching.

Peak memory: the rise of the child's anonymous resident memory (``RssAnon``, sampled every 2 ms)
during the step, the imports done before it; file pages in the page cache are not counted. The
adapter's factors, parsed inside the step, are part of it (449 MB for the LoHa file).

    python benchmarks/bake_sdxl.py [--reps N] [--adapters LIST]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OUT = HERE / ".cache" / "bake_out"
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors")


def child(kind: str, adapter: str | None) -> dict:
    from first_load import MODEL_DIR, Step

    from lohakr.loaders.bake import bake, meta_components

    meta_components(MODEL_DIR)  # the imports (diffusers, transformers) happen here, outside the step
    shutil.rmtree(OUT, ignore_errors=True)
    with Step() as step:
        if kind == "bake":
            result = bake(MODEL_DIR, [adapter], OUT)
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
    return figures


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
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] or None)))
        return 0
    from first_load import prepare_model
    from patch_sdxl import ADAPTERS, make_adapter_file

    prepare_model()
    paths = {name: str(make_adapter_file(name, ADAPTERS[name])) for name in args.adapters.split(",")}
    runs: dict[str, list[dict]] = {}
    for _ in range(args.reps):  # interleaved, so a drifting machine slows all alike
        for kind in ("copy-kernel", "copy-rw"):
            runs.setdefault(kind, []).append(run(kind))
        for name, path in paths.items():
            runs.setdefault(f"bake {name}", []).append(run("bake", path))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
