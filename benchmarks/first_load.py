"""The first load a user feels: one fresh process per measurement, which loads full-size fp16 SDXL
(UNet + CLIP-L + CLIP-G) from safetensors files, then applies one adapter (parse included), then
changes its strength and unloads it. Beside it, in fresh processes of their own: LyCORIS' merge on
the same model, and ComfyUI's native LoRA patching (with COMFYUI_DIR set: ComfyUI's own loaders on
the same files, run with COMFYUI_PYTHON). The roofline is measured in the same run.

    python benchmarks/first_load.py [--reps N] [--adapters LIST] [--json FILE]
    python benchmarks/first_load.py --report FILE     # print a saved run again

Two ways the model can sit in memory, both measured:

- ``mapped``: as ``from_pretrained`` leaves it, every weight a copy-on-write view of its mapped file;
- ``copied``: every weight copied into ordinary memory after loading (as a cast, a device move or a
  host that copies into its own parameters leaves it). ``lohakr-ram`` is lohakr on it with
  ``keep_originals_on="cpu"``: originals kept in memory, the choice the file mode replaces.

Memory: the child samples its anonymous resident memory (``RssAnon``) every 2 ms during each step;
"extra" is the peak rise above the model as loaded less the bytes of the patched weights that had
to leave the mapped file's pages for their own (a mapped model cannot be patched without them).
The model files (6.3 GiB) and adapters are cached in benchmarks/.cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL_DIR = HERE / ".cache" / "sdxl_fp16"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


# -- the model on disk ---------------------------------------------------------------------------
def prepare_model() -> Path:
    """Full-size SDXL fp16 as a diffusers folder (seeded random weights), written once."""
    if all((MODEL_DIR / c).is_dir() for c in COMPONENTS):
        return MODEL_DIR
    import torch
    from patch_sdxl import build_models

    parts = build_models(torch.float16, "cpu")
    for name, part in parts.items():
        part.save_pretrained(MODEL_DIR / name)
    return MODEL_DIR


def load_model(memory: str) -> dict:
    """The three components from the folder, as ``from_pretrained`` leaves them (``mapped``) or
    then copied into ordinary memory (``copied``)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    parts = {
        "unet": UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet", dtype=torch.float16),
        "text_encoder": CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder", dtype=torch.float16),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(MODEL_DIR / "text_encoder_2",
                                                                      dtype=torch.float16),
    }
    for part in parts.values():
        part.eval().requires_grad_(False)
        if memory == "copied":
            for param in part.parameters():
                param.data = param.data.clone()
    return parts


# -- measuring inside a child ----------------------------------------------------------------------
def _status(field: str) -> int:
    from patch_sdxl import _status_bytes  # imports torch: not at the top, so --report runs without it

    return _status_bytes(field)


# The memory sampler: a process of its own that reads the measured process's RssAnon every 2 ms
# between "start" and "stop" and answers the peak. A sampling thread inside the measured process
# would take the GIL 500 times a second and preempt the patch's OpenMP threads on a 2-core machine
# (measured: first loads up to 1.5× slower with one).
SAMPLER = r"""
import select, sys
path = "/proc/%s/status" % sys.argv[1]
def anon():
    with open(path) as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0
sampling, peak = False, 0
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.002 if sampling else None)
    if ready:
        command = sys.stdin.readline().strip()
        if command == "start":
            sampling, peak = True, anon()
            print("ok", flush=True)
        elif command == "stop":
            sampling, peak = False, max(peak, anon())
            print(peak, flush=True)
        else:
            break
    elif sampling:
        peak = max(peak, anon())
"""


class Sampler:
    """The sampler process for this process (one per child, reused by every step)."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", SAMPLER, str(os.getpid())], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def ask(self, command: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


class Step:
    """Times one step and samples ``RssAnon`` during it (peak, from the sampler process), with the
    minor page faults."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def __enter__(self):
        self.base = _status("RssAnon")
        self.sampler.ask("start")
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults
        self.after = _status("RssAnon")
        self.peak = max(int(self.sampler.ask("stop")), self.after)
        return False

    def figures(self, model_anon: int, left_mapping: int = 0) -> dict:
        return {"s": self.seconds, "page_faults": self.faults,
                "peak_extra_bytes": self.peak - model_anon - left_mapping,
                "after_extra_bytes": self.after - model_anon - left_mapping}


def child(contender: str, memory: str, adapter_path: str) -> dict:
    import torch

    torch.set_grad_enabled(False)
    started = time.perf_counter()
    parts = load_model(memory)
    gc.collect()  # the model's own objects: a full collection they trigger is not charged to the next step
    model_anon = _status("RssAnon")
    result = {"contender": contender, "memory": memory, "model_load_s": time.perf_counter() - started}
    sampler = Sampler()
    if contender.startswith("lohakr"):
        from types import SimpleNamespace

        import lohakr

        keep = "cpu" if contender == "lohakr-ram" else "auto"
        pipe = lohakr.enable(SimpleNamespace(**parts, _progress_bar_config={"disable": True}),
                             keep_originals_on=keep)
        with Step(sampler) as load:
            report = pipe.load_lycoris(adapter_path, "a")
        moved = report.originals.get("mapped", {}).get("bytes", 0)  # left the file's pages for their own
        result["load"] = load.figures(model_anon, moved)
        result["originals"] = report.originals
        with Step(sampler) as strength:
            pipe.set_lycoris_strength("a", 0.5)
        result["strength"] = strength.figures(model_anon, moved)
        with Step(sampler) as unload:
            pipe.unload_lycoris("a")
        result["unload"] = unload.figures(model_anon)
        with Step(sampler) as reload:  # the steady state: the same load again in the same process
            pipe.load_lycoris(adapter_path, "a")
        result["reload"] = reload.figures(model_anon, moved)
    elif contender == "lycoris":
        from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
        from lycoris.utils.preset import read_preset
        from patch_sdxl import CACHE, lycoris_preset
        from safetensors.torch import load_file

        # Its default "full" preset fails on diffusers UNets ("duplicated lora name"); the fixed one.
        LycorisNetworkKohya.apply_preset(read_preset(lycoris_preset(CACHE)))
        te = [parts["text_encoder"], parts["text_encoder_2"]]
        with Step(sampler) as load:
            weights = load_file(adapter_path)
            network, weights = create_network_from_weights(1.0, adapter_path, None, te, parts["unet"],
                                                           weights_sd=weights)
            network.merge_to(te, parts["unet"], weights, torch.float16, "cpu")
        result["load"] = load.figures(model_anon)
    sampler.close()
    return result


# -- ComfyUI's child, run in ComfyUI's Python -------------------------------------------------------
COMFY_CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from comfy.cli_args import args
args.cpu = True
import comfy.sd, comfy.utils
model_dir, adapter = sys.argv[2], sys.argv[3]
torch.set_grad_enabled(False)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
started = time.perf_counter()
model = comfy.sd.load_diffusion_model(model_dir + "/unet/diffusion_pytorch_model.safetensors")
clip = comfy.sd.load_clip([model_dir + "/text_encoder/model.safetensors",
                           model_dir + "/text_encoder_2/model.safetensors"],
                          clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
import gc
gc.collect()
model_load = time.perf_counter() - started
base = status("RssAnon")
import subprocess
sampler = subprocess.Popen([sys.executable, "-c", sys.argv[4], str(os.getpid())], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
def ask(command):
    sampler.stdin.write(command + "\n"); sampler.stdin.flush()
    return sampler.stdout.readline().strip()
ask("start")
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
lora = comfy.utils.load_torch_file(adapter, safe_load=True)
patched_model, patched_clip = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
patched_model.patch_model()
patched_clip.patcher.patch_model()
seconds = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
after = status("RssAnon")
peak = max(int(ask("stop")), after)
sampler.stdin.close(); sampler.wait()
print(json.dumps({"contender": "comfyui", "memory": "copied", "model_load_s": model_load, "load": {"s": seconds,
      "page_faults": faults, "peak_extra_bytes": peak - base, "after_extra_bytes": after - base}}))
"""


def run_child(contender: str, memory: str, adapter: Path) -> dict:
    if contender == "comfyui":
        comfy_dir = os.environ["COMFYUI_DIR"]
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        command = [python, "-c", COMFY_CHILD, comfy_dir, str(MODEL_DIR), str(adapter), SAMPLER]
    else:
        command = [sys.executable, __file__, "--child", contender, memory, str(adapter)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(HERE.parent), check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"contender": contender, "memory": memory, "error": (done.stderr or done.stdout)[-600:]}
    return json.loads(lines[-1])


def by_contender(entry: dict) -> dict[tuple, list]:
    """An adapter's runs per (contender, memory), in run order."""
    groups: dict[tuple, list] = {}
    for run in entry["runs"]:
        groups.setdefault((run["contender"], run["memory"]), []).append(run)
    return groups


def median_of(runs: list[dict], step: str, field: str) -> float | None:
    values = [r[step][field] for r in runs if step in r]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--adapters", default="loha_d32_tucker,lokr_f8,lokr_full_w2")
    parser.add_argument("--contenders", default="all",
                        help="comma-separated runs to make, as contender/memory (lohakr/copied,lycoris/mapped,...)")
    parser.add_argument("--json")
    parser.add_argument("--report")
    parser.add_argument("--markdown", action="store_true", help="with --report: the table of benchmarks/README.md")
    parser.add_argument("--child", nargs=3, metavar=("CONTENDER", "MEMORY", "ADAPTER"))
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    if args.report:
        report = json.loads(Path(args.report).read_text())
        print(markdown(report)) if args.markdown else summarize(report)
        return 0

    import torch
    from patch_sdxl import ADAPTERS, adapter_cost, machine_peaks, make_adapter_file

    import lohakr
    from lohakr.loaders.reference_models import reference_layout

    prepare_model()
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__}, "adapters": {}}
    layout = reference_layout("sdxl")
    for name in args.adapters.split(","):
        path = make_adapter_file(name, ADAPTERS[name])
        flops, bytes_min, largest = adapter_cost(lohakr.load_adapter(path), layout, torch.float16)
        entry = {"file_mb": path.stat().st_size / 1e6, "flops": flops, "bytes_min": bytes_min,
                 "largest_delta_bytes": largest, "runs": []}
        runs = [("lohakr", "mapped"), ("lohakr", "copied"), ("lohakr-ram", "copied"), ("lycoris", "mapped"),
                ("lycoris", "copied")]
        if os.environ.get("COMFYUI_DIR"):
            runs.append(("comfyui", "copied"))
        if args.contenders != "all":
            chosen = {tuple(item.split("/")) for item in args.contenders.split(",")}
            runs = [run for run in runs if run in chosen]
        bounds = []
        for _ in range(args.reps):  # interleaved, so a drifting machine slows all alike
            peaks = machine_peaks("cpu")
            bounds.append(max(flops / peaks["gemm_flops"], bytes_min / peaks["bandwidth"]))
            entry.setdefault("roofline", []).append(peaks)
            for contender, memory in runs:
                result = run_child(contender, memory, path)
                entry["runs"].append(result)
                print(f"  {name} {contender}/{memory}: "
                      + (f"{result['load']['s']:.2f} s" if "load" in result else result.get("error", "")[-300:]),
                      flush=True)
        entry["bound_s"] = statistics.median(bounds)
        report["adapters"][name] = entry
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    summarize(report)
    return 0


def summarize(report: dict) -> None:
    print(f"\nmachine: {report['machine']}")
    for name, entry in report["adapters"].items():
        bound = entry["bound_s"]
        fresh_rate = statistics.median(r["first_touch_bandwidth"] for r in entry["roofline"])
        patched_bytes = entry["bytes_min"] / 2
        entry["bound_with_fresh_pages_s"] = bound + patched_bytes / fresh_rate
        print(f"\n{name}: {entry['file_mb']:.0f} MB; roofline bound {bound:.2f} s; with the patched weights "
              f"written to fresh memory ({fresh_rate / 1e9:.1f} GB/s here), as a mapped model needs: "
              f"{entry['bound_with_fresh_pages_s']:.2f} s (largest layer's float32 ΔW "
              f"{entry['largest_delta_bytes'] / 2**20:.0f} MiB)")
        for (contender, memory), runs in by_contender(entry).items():
            ok = [r for r in runs if "load" in r]
            if not ok:
                print(f"  {contender:8} {memory:7} failed: {runs[0].get('error', '')[-200:]}")
                continue
            load = median_of(ok, "load", "s")
            model_load = statistics.median(r.get("model_load_s", 0.0) for r in ok)
            line = (f"  {contender:10} {memory:7} model load {model_load:5.1f} s, "
                    f"first load {load:6.2f} s ({load / bound:4.1f}× bound"
                    + (f", {load / entry['bound_with_fresh_pages_s']:.1f}× with fresh pages)  " if memory == "mapped"
                       else ")  ")
                    +
                    f"extra anon peak {median_of(ok, 'load', 'peak_extra_bytes') / 2**20:7.0f} MiB, after "
                    f"{median_of(ok, 'load', 'after_extra_bytes') / 2**20:7.0f} MiB, "
                    f"{median_of(ok, 'load', 'page_faults') / 1e6:.2f} M faults")
            if "strength" in ok[0]:
                line += (f"; strength {median_of(ok, 'strength', 's'):.2f} s, "
                         f"unload {median_of(ok, 'unload', 's'):.2f} s")
            if "reload" in ok[0]:
                line += f", load again {median_of(ok, 'reload', 's'):.2f} s"
            print(line)


ADAPTER_NAMES = {"loha_d32_tucker": "LoHa dim 32, conv Tucker", "lokr_f8": "LoKr factor 8",
                 "lokr_full_w2": "LoKr full w2"}


def markdown(report: dict) -> str:
    """Per adapter and contender: median first load (× bound), strength change, unload, extra memory."""
    lines = ["| adapter | contender | model in | first load (× bound) | strength | unload | load again | "
             "extra memory (peak) |", "|---|---|---|---|---|---|---|---|"]
    for name, entry in report["adapters"].items():
        if "bound_with_fresh_pages_s" not in entry:
            fresh = statistics.median(r["first_touch_bandwidth"] for r in entry["roofline"])
            entry["bound_with_fresh_pages_s"] = entry["bound_s"] + entry["bytes_min"] / 2 / fresh
        for (contender, memory), runs in by_contender(entry).items():
            ok = [r for r in runs if "load" in r]
            if not ok:
                continue
            load = median_of(ok, "load", "s")
            times = f"{load:.2f} s ({load / entry['bound_s']:.1f}×"
            with_fresh = load / entry["bound_with_fresh_pages_s"]
            times += f"; {with_fresh:.1f}× with fresh pages)" if memory == "mapped" else ")"
            cells = [ADAPTER_NAMES.get(name, name), contender, memory, times]
            for step in ("strength", "unload", "reload"):
                cells.append(f"{median_of(ok, step, 's'):.2f} s" if step in ok[0] else "")
            cells.append(f"+{median_of(ok, 'load', 'peak_extra_bytes') / 2**20:.0f} MiB")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
