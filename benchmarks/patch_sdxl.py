"""Side-by-side benchmark at full SDXL size: lohakr vs LyCORIS' merge (and ComfyUI's native LoraLoader
when COMFYUI_DIR is set), with a roofline and scaling in rank and stack depth.

    python benchmarks/patch_sdxl.py                       # fp16, CPU, all three adapters, 3 repetitions
    python benchmarks/patch_sdxl.py --dtype fp32 --reps 5 --device cuda --scaling
    python benchmarks/patch_sdxl.py --dtype fp32 --parts unet   # one part, where the whole model twice does not fit

Models: the full SDXL UNet and both CLIP text encoders, built on the meta device from the embedded
configs and materialised with seeded random weights. Adapters: real files written by lycoris-lora
(kohya names) for the kohya-default module set plus the conv modules: LoHa dim 32 / alpha 16 with
conv dim 16 Tucker; LoKr factor 8; LoKr factor -1 with full w2. Cached in benchmarks/.cache. With
--parts, only the UNet or only the text encoders are built, and the files keep their modules.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

try:
    import resource  # kernel CPU time and page faults (Unix)
except ImportError:  # Windows: those two figures read 0
    resource = None

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
ADAPTERS = {
    "loha_d32_tucker": dict(algo="loha", network_dim=32, network_alpha=16, conv_dim=16, conv_alpha=8, use_tucker=True),
    "lokr_f8": dict(algo="lokr", network_dim=16, network_alpha=8, factor=8),
    "lokr_full_w2": dict(algo="lokr", network_dim=100000, network_alpha=1, factor=-1),
}
# --parts: the components built, and the kohya prefixes of their modules in the files.
PARTS = {"all": ("unet", "text_encoder", "text_encoder_2"), "unet": ("unet",),
         "text_encoders": ("text_encoder", "text_encoder_2")}
FILE_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


# -- measuring -----------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_bytes() -> int:
    return _status_bytes("VmHWM")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _kernel_usage() -> tuple[float, int]:
    """This process's kernel CPU seconds and minor page faults so far ((0, 0) where unknown)."""
    if resource is None:
        return 0.0, 0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_stime, usage.ru_minflt


class Timer:
    """Median wall time of a callable; also the peak memory it added (RSS on CPU, allocator on CUDA).
    Every run's time is kept in ``runs`` (label → list), for the spread, and the CPU time the
    kernel spent for the process (mostly faulting in fresh pages) and its minor page faults in
    ``kernel`` (label → list of (seconds, faults))."""

    def __init__(self, device: str, warmup: int = 1):
        self.device = device
        self.warmup = warmup
        self.runs: dict[str, list[float]] = {}
        self.kernel: dict[str, list[tuple[float, int]]] = {}

    def _once(self, fn) -> tuple[float, int, float, int]:
        """One timed run: wall seconds, peak bytes added, kernel CPU seconds, minor page faults."""
        gc.collect()
        sync(self.device)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            reset_peak()
            base = rss_bytes()
        before = _kernel_usage()
        start = time.perf_counter()
        fn()
        sync(self.device)
        wall = time.perf_counter() - start
        after = _kernel_usage()
        peak = torch.cuda.max_memory_allocated() if self.device.startswith("cuda") else peak_bytes()
        return wall, max(0, peak - base), after[0] - before[0], after[1] - before[1]

    def _keep(self, label: str | None, times: list[float], kernel: list[tuple[float, int]]) -> None:
        if label:
            self.runs[label] = times
            self.kernel[label] = kernel

    def __call__(self, fn, setup=None, reps: int = 3, label: str | None = None, warmup: int | None = None):
        """``warmup`` untimed runs first (default: the timer's): on a VM the first touch of fresh
        memory can cost more than the work itself, and that is the host's, not the code's."""
        for _ in range(self.warmup if warmup is None else warmup):
            if setup:
                setup()
            fn()
        times, peaks, kernel = [], [], []
        for _ in range(reps):
            if setup:
                setup()
            wall, peak, kernel_s, faults = self._once(fn)
            times.append(wall)
            peaks.append(peak)
            kernel.append((kernel_s, faults))
        self._keep(label, times, kernel)
        return statistics.median(times), max(peaks)

    def cycle(self, steps: list[tuple[str, Callable[[], object]]], reps: int = 3, tag: str = "",
              warmup: int | None = None) -> dict[str, tuple[float, int]]:
        """Run ``steps`` in order ``reps`` times (after untimed warm-up cycles), timing each step.
        Interleaved, so a VM's drift slows every step of a cycle alike and their ratios hold.
        Returns label → (median seconds, peak bytes added)."""
        for _ in range(self.warmup if warmup is None else warmup):
            for _, fn in steps:
                fn()
        measured = {label: ([], [], []) for label, _ in steps}
        for _ in range(reps):
            for label, fn in steps:
                wall, peak, kernel_s, faults = self._once(fn)
                times, peaks, kernel = measured[label]
                times.append(wall)
                peaks.append(peak)
                kernel.append((kernel_s, faults))
        result = {}
        for label, (times, peaks, kernel) in measured.items():
            self._keep(tag + label, times, kernel)
            result[label] = (statistics.median(times), max(peaks))
        return result


# -- models and files ---------------------------------------------------------------------------
def build_models(dtype: torch.dtype, device: str, components: tuple[str, ...] = PARTS["all"], seed: int = 0) -> dict:
    """The full-size SDXL ``components`` (all three by default), seeded random weights."""
    from lohakr.loaders.reference_models import build_components

    parts = {name: part for name, part in build_components("sdxl", "meta").items() if name in components}
    g = torch.Generator(device=device).manual_seed(seed)
    for part in parts.values():
        part.to(dtype)
        part.to_empty(device=device)
        with torch.no_grad():
            for p in part.parameters():
                p.normal_(0, 0.02, generator=g)
        part.eval().requires_grad_(False)
    return parts


def memory_needed(dtype: torch.dtype, components: tuple[str, ...] = PARTS["all"]) -> tuple[int, int]:
    """The models' bytes in ``dtype`` (counted on the meta device) and about what a CPU run needs:
    the models twice (a reversible load gives every patched weight new storage beside its kept
    original; the fused run snapshots them; LyCORIS' merge adds about 0.6x) plus 1 GiB."""
    from lohakr.loaders.reference_models import build_components

    count = sum(p.numel() for name, part in build_components("sdxl", "meta").items() if name in components
                for p in part.parameters())
    model = count * torch.tensor([], dtype=dtype).element_size()
    return model, 2 * model + 2**30


def memory_available() -> int:
    """``MemAvailable`` from /proc/meminfo (0 where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def lycoris_preset(directory: Path) -> str:
    import toml
    from lycoris.config import FULL_TEXT_ENCODER_MODULES, FULL_UNET_MODULES

    path = directory / "preset_full_diffusers.toml"
    path.write_text(toml.dumps(dict(enable_conv=True, unet_target_module=list(FULL_UNET_MODULES),
                                    unet_target_name=["conv_in", "conv_out"],
                                    text_encoder_target_module=list(FULL_TEXT_ENCODER_MODULES),
                                    text_encoder_target_name=[])))
    return str(path)


def cached_adapter_file(name: str, config: dict, components: tuple[str, ...] = PARTS["all"]) -> Path:
    import hashlib

    tag = "_".join(f"{k}{v}" for k, v in sorted(config.items()))
    subset = "" if set(components) == set(PARTS["all"]) else "__" + "+".join(components)
    return CACHE / f"{name}__{hashlib.sha1(tag.encode()).hexdigest()[:10]}{subset}.safetensors"


def make_adapter_file(name: str, config: dict, components: tuple[str, ...] = PARTS["all"]) -> Path:
    """A real lycoris-lora file for the full SDXL (cached by name and config); for a subset of its
    components, that file's modules of those components (cached too)."""
    CACHE.mkdir(exist_ok=True)
    path = cached_adapter_file(name, config, components)
    if path.exists():
        return path
    full = cached_adapter_file(name, config)
    if not full.exists():
        _write_lycoris_file(full, config)
    if path != full:
        from safetensors import safe_open
        from safetensors.torch import save_file

        prefixes = tuple(FILE_PREFIXES[c] for c in components)
        with safe_open(str(full), "pt") as f:
            kept = {key: f.get_tensor(key) for key in f.keys() if key.startswith(prefixes)}
            metadata = f.metadata()
        save_file(kept, str(path), metadata)
    return path


def _write_lycoris_file(path: Path, config: dict) -> None:
    """lycoris-lora's network on the full SDXL, built on the meta device (the file needs only the
    shapes: it is the same, tensor for tensor, as one made on materialised models), seeded random
    factors, saved in fp16 with kohya names."""
    from lycoris.kohya import create_network

    from lohakr.loaders.reference_models import build_components

    parts = build_components("sdxl", "meta")
    for part in parts.values():
        part.to(torch.float16).eval().requires_grad_(False)
    kw = dict(config)
    te = [parts["text_encoder"], parts["text_encoder_2"]]
    network = create_network(1.0, kw.pop("network_dim"), kw.pop("network_alpha"), None, te, parts["unet"],
                             preset=lycoris_preset(CACHE), **kw)
    network.apply_to(te, parts["unet"], apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    network.save_weights(str(path), torch.float16, {"ss_network_module": "lycoris.kohya",
                                                    "ss_base_model_version": "sdxl_base_v1-0"})


# -- roofline ------------------------------------------------------------------------------------
def gemm_peak(device: str) -> dict:
    """The fp32 GEMM rate: a square GEMM and a rank-32 batched GEMM of LoHa's row-block shape,
    which can run faster than the square one (on this project's 2-core CPU VM: 150-175 against
    137 GFLOP/s); a lower bound takes the best. About 0.3 s on a CPU."""
    n = 4096 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 10 if device.startswith("cuda") else 3
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    flops = 2 * n**3 * reps / (time.perf_counter() - start)
    rows, rank, width = (2048, 32, 2560) if device.startswith("cuda") else (512, 32, 2560)
    outs = torch.randn(2, rows, rank, device=device)
    ins = torch.randn(2, rank, width, device=device)
    both = torch.empty(2, rows, width, device=device)
    torch.bmm(outs, ins, out=both)
    sync(device)
    batched_reps = 20 * reps
    start = time.perf_counter()
    for _ in range(batched_reps):
        torch.bmm(outs, ins, out=both)
    sync(device)
    batched = 2 * 2 * rows * rank * width * batched_reps / (time.perf_counter() - start)
    return {"gemm_flops": max(flops, batched), "square_gemm_flops": flops, "rank32_gemm_flops": batched}


def gemm_recorder(rates: list[float], device: str) -> Callable[[], None]:
    """A cycle step that measures the GEMM rate now and appends it to ``rates``."""
    return lambda: rates.append(gemm_peak(device)["gemm_flops"])


def machine_peaks(device: str) -> dict:
    """The roofline's inputs, measured now: fp32 GEMM rates, copy bandwidth, fresh-memory write rate."""
    peaks = gemm_peak(device)
    reps = 10 if device.startswith("cuda") else 3
    size = 256 * 2**20
    x = torch.empty(size // 4, device=device, dtype=torch.float32).fill_(1)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    bandwidth = 2 * size * reps / (time.perf_counter() - start)
    del x, y
    # Writing memory the process has not touched yet (what a reversible patch needs: the patched
    # weights and the kept originals coexist), best of 3 fresh 1 GiB buffers. On the CPU they are
    # mapped from the kernel directly: from torch's allocator, memory freed earlier in the
    # process may come back already resident and measure as a plain write.
    fresh = 0.0
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        if device.startswith("cuda"):
            z = torch.empty(2**30 // 4, device=device, dtype=torch.float32).fill_(0)
        else:
            z = torch.frombuffer(mmap.mmap(-1, 2**30), dtype=torch.float32).fill_(0)
        sync(device)
        fresh = max(fresh, 2**30 / (time.perf_counter() - start))
        del z
    return {**peaks, "bandwidth": bandwidth, "first_touch_bandwidth": fresh}


def adapter_cost(adapter, layout, dtype: torch.dtype) -> tuple[float, float, int]:
    """FLOPs to rebuild every ΔW, the minimum bytes (read + write each touched weight once) and
    the float32 size of the largest touched layer's ΔW (the memory target's allowance)."""
    from lohakr import resolve

    matches, _ = resolve(adapter, layout, check_base_model=False)
    flops = 0.0
    touched = {}
    for m in matches:
        mod = m.module
        shape = m.target.weight_shape
        numel = float(torch.Size(shape).numel())
        f = mod.factors
        if mod.kind == "loha":
            r = mod.rank
            if mod.tucker:
                k = float(torch.Size(f["hada_t1"].shape[2:]).numel())
                out_dim, in_dim = shape[0], shape[1]
                flops += 2 * (2 * r * r * in_dim * k + 2 * r * out_dim * in_dim * k) + numel
            else:
                flops += 2 * (2 * numel * r) + numel
        elif mod.kind == "lokr":
            w2 = float(torch.Size(mod.w2_shape).numel())
            flops += numel + (2 * w2 * mod.rank if mod.rank else 0)
        flops += 2 * numel  # scale and add
        touched[m.target.key] = numel
    bytes_min = 2 * sum(touched.values()) * torch.tensor([], dtype=dtype).element_size()
    return flops, bytes_min, int(4 * max(touched.values()))


# -- the runs ------------------------------------------------------------------------------------
def run_lohakr(parts, path, timer, reps, keep_originals_on="auto", tag=""):
    import lohakr

    pipe = lohakr.enable(SimpleNamespace(**parts, _progress_bar_config={"disable": True}),
                         keep_originals_on=keep_originals_on)
    parse, _ = timer(lambda: lohakr.load_adapter(path), reps=reps, label=f"{tag}parse")
    adapter = lohakr.load_adapter(path)
    results = {"parse_s": parse}

    def unload():
        if pipe.lycoris_adapters():
            pipe.unload_lycoris()

    def copy_same_bytes():
        """A plain copy of every kept original into its live weight: the memory traffic a strength
        change cannot avoid, timed in the same cycle (a VM's bandwidth drifts 2-3x in minutes)."""
        with torch.no_grad():
            for kept in pipe.__dict__["_lohakr_patcher"].originals.values():
                kept.target.layer.weight.copy_(kept.weight)

    gemm_rates: list[float] = []
    unload()
    cycle = timer.cycle([("load", lambda: pipe.load_lycoris(adapter, "bench")),
                         ("gemm", gemm_recorder(gemm_rates, timer.device)),
                         ("copy", copy_same_bytes),  # the strength change below recomputes every weight
                         ("strength", lambda: pipe.set_lycoris_strength("bench", 0.5)),
                         ("unload", lambda: pipe.unload_lycoris("bench"))], reps=reps, tag=tag)
    results.update(load_patch_s=cycle["load"][0], peak_extra_bytes=cycle["load"][1],
                   strength_s=cycle["strength"][0], unload_s=cycle["unload"][0],
                   same_bytes_copy_s=cycle["copy"][0], cycle_gemm_flops=gemm_rates[-reps:])
    pipe.load_lycoris(adapter, "bench")
    results["kept_originals_bytes"] = pipe.__dict__["_lohakr_patcher"].kept_bytes
    unload()
    if keep_originals_on == "auto":
        results.update(run_fused(parts, adapter, timer, reps, tag))
    results["runs"] = {k[len(tag):]: v for k, v in timer.runs.items() if k.startswith(tag)}
    results["kernel"] = {k[len(tag):]: v for k, v in timer.kernel.items() if k.startswith(tag)}
    return results


def run_fused(parts, adapter, timer, reps, tag) -> dict:
    """``enable(pipe, fuse=True)``: added into the weights in place, nothing kept (LyCORIS' merge,
    exactly scaled). The touched weights are put back from a snapshot between runs (not timed)."""
    import lohakr

    pipe = lohakr.enable(SimpleNamespace(**parts, _progress_bar_config={"disable": True}), fuse=True)
    layout = lohakr.ModelLayout.from_diffusers(**parts)
    touched = {m.target.key: m.target.layer for m in lohakr.resolve(adapter, layout, check_base_model=False)[0]}
    snapshot = {key: layer.weight.detach().clone() for key, layer in touched.items()}

    def restore():
        pipe.__dict__.pop("_lohakr_patcher", None)  # forget the fused adapter; weights back below
        with torch.no_grad():
            for key, layer in touched.items():
                layer.weight.copy_(snapshot[key])

    # Restoring is itself a copy of the same weights (read the snapshot, write the live weight):
    # timed in the same cycle, it is the fused load's memory reference.
    gemm_rates: list[float] = []
    cycle = timer.cycle([("fused_restore", restore),
                         ("fused_gemm", gemm_recorder(gemm_rates, timer.device)),
                         ("fused", lambda: pipe.load_lycoris(adapter, "fused"))], reps=reps, tag=tag)
    restore()
    snapshot.clear()
    gc.collect()
    return {"fused_load_s": cycle["fused"][0], "fused_peak_extra_bytes": cycle["fused"][1],
            "fused_restore_copy_s": cycle["fused_restore"][0], "fused_cycle_gemm_flops": gemm_rates[-reps:]}


def run_lycoris(parts, path, timer, reps, device, dtype, warmup=1):
    """LyCORIS' own path: create_network_from_weights + merge_to (bakes s² for α ≠ r,
    docs/format.md#lycoris-double-scale)."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
    from lycoris.utils.preset import read_preset
    from safetensors.torch import load_file

    # Its default "full" preset fails on diffusers UNets ("duplicated lora name"); use the fixed one.
    LycorisNetworkKohya.apply_preset(read_preset(lycoris_preset(CACHE)))
    te = [parts[name] for name in ("text_encoder", "text_encoder_2") if name in parts]
    unet = parts.get("unet", torch.nn.Module())  # an empty module: no UNet modules to merge
    snapshot = {}
    for name, part in parts.items():
        for key, value in part.state_dict().items():
            snapshot[(name, key)] = value.detach().to("cpu", copy=True)

    def restore():
        with torch.no_grad():
            for (name, key), value in snapshot.items():
                parts[name].state_dict()[key].copy_(value)

    def merge():
        weights = load_file(str(path))
        network, weights = create_network_from_weights(1.0, str(path), None, te, unet, weights_sd=weights)
        network.merge_to(te, unet, weights, dtype, device)

    try:
        total, peak = timer(merge, setup=restore, reps=reps, warmup=warmup, label=f"lycoris:{path.name}")
        result = {"load_patch_s": total, "peak_extra_bytes": peak}
    except Exception as err:  # noqa: BLE001 - a peer failing on its own files is a result to report
        result = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
    restore()
    snapshot.clear()
    gc.collect()
    return result


def run_comfy(paths: dict, dtype: str, reps: int, warmup: int) -> dict:
    """The ComfyUI peer (``comfy_peer.py``) in its own process, twice: timed under the default
    allocator, then once more for memory with glibc's mmap threshold fixed at 1 MiB. Under the
    default, resident memory during patching mostly shows where glibc happens to reuse freed
    heap (ComfyUI's own LoKr patching rose +2.4 GiB in one run, +0.006 GiB in the next); with
    every large block mapped and unmapped on its own, the peak is what each loader holds."""
    comfy = os.environ.get("COMFYUI_DIR")
    if not comfy:
        return {"skipped": "COMFYUI_DIR not set"}
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    files = json.dumps({k: str(v) for k, v in paths.items()})

    def peer(reps: int, warmup: int, env: dict | None = None) -> dict:
        out = subprocess.run([python, str(HERE / "comfy_peer.py"), comfy, dtype, str(reps), str(warmup), files],
                             capture_output=True, text=True, timeout=3600, env={**os.environ, **(env or {})})
        if out.returncode != 0:
            return {"error": out.stderr[-800:]}
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = peer(reps, warmup)
    if "adapters" in result:
        result["live_memory"] = peer(1, 1, {"MALLOC_MMAP_THRESHOLD_": str(2**20)}).get("adapters", {})
    return result


def fmt_s(x):
    return f"{x:7.2f} s" if isinstance(x, (int, float)) else str(x)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["fp16", "fp32", "bf16"], default="fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--adapters", default=",".join(ADAPTERS),
                        help="comma-separated subset of " + ", ".join(ADAPTERS))
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each timed measurement")
    parser.add_argument("--peer-reps", type=int, default=1, help="repetitions for the (slow) LyCORIS peer")
    parser.add_argument("--peer-warmup", type=int, default=1, help="untimed LyCORIS runs first (0 saves minutes)")
    parser.add_argument("--no-lycoris", action="store_true", help="skip the LyCORIS peer")
    parser.add_argument("--scaling", action="store_true", help="also time rank 4..128 and 1..8 stacked adapters")
    parser.add_argument("--parts", choices=list(PARTS), default="all",
                        help="build only the UNet or only the text encoders (each at full size; the files keep "
                             "their modules): for a dtype whose whole model twice does not fit in memory")
    parser.add_argument("--json", help="write all figures to this file")
    parser.add_argument("--report", metavar="JSON",
                        help="print the figures of a run saved with --json, measure nothing")
    args = parser.parse_args(argv)
    if args.report:
        summarize(json.loads(Path(args.report).read_text()))
        return 0
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = args.device
    components = PARTS[args.parts]
    if device == "cpu":
        model, needed = memory_needed(dtype, components)
        available = memory_available()
        if available and available < needed:
            smaller = "--dtype fp16, --parts unet or --parts text_encoders" if args.parts == "all" else "--dtype fp16"
            print(f"not enough memory for a full-size {args.dtype} run of {args.parts}: the models take "
                  f"{model / 2**30:.1f} GiB and a reversible load keeps every original beside its patched copy, "
                  "so the "
                  f"run needs about {needed / 2**30:.1f} GiB; {available / 2**30:.1f} GiB is available. Use {smaller} "
                  "or a machine with more memory.", file=sys.stderr)
            return 2
    timer = Timer(device, args.warmup)
    report: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                                "threads": torch.get_num_threads(), "device": device,
                                "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
                    "dtype": args.dtype, "parts": list(components)}
    from lohakr.loaders import native

    if device == "cpu":
        native.usable(torch.empty(1, dtype=dtype))  # build and check now, not inside a timed load
        if native.loha_usable(torch.empty(1, dtype=dtype)):
            native.loha_fused_rank_ok(dtype, 32)  # and the fused LoHa kernel at the files' rank
    report["machine"]["native_kernels"] = native.status()
    print(native.status())
    peaks = machine_peaks(device)
    report["roofline"] = peaks
    print(f"machine: {device}, {torch.get_num_threads()} threads; GEMM {peaks['gemm_flops'] / 1e9:.1f} GFLOP/s (fp32; "
          f"square {peaks['square_gemm_flops'] / 1e9:.0f}, rank-32 batched {peaks['rank32_gemm_flops'] / 1e9:.0f}), "
          f"copy bandwidth {peaks['bandwidth'] / 1e9:.1f} GB/s, "
          f"writing fresh memory {peaks['first_touch_bandwidth'] / 1e9:.1f} GB/s")
    names = [n for n in args.adapters.split(",") if n]
    paths = {name: make_adapter_file(name, ADAPTERS[name], components) for name in names}
    # The ComfyUI peer runs first, in its own process, while this one holds no model yet.
    report["comfyui"] = (run_comfy(paths, args.dtype, args.reps, args.warmup) if "unet" in components
                         else {"skipped": "the ComfyUI peer builds and patches the UNet only"})
    start = time.perf_counter()
    parts = build_models(dtype, device, components)
    model_bytes = sum(p.numel() * p.element_size() for part in parts.values() for p in part.parameters())
    built = {"all": "UNet + CLIP-L + CLIP-G", "unet": "UNet", "text_encoders": "CLIP-L + CLIP-G"}[args.parts]
    print(f"full SDXL {built}: {model_bytes / 2**30:.2f} GiB {args.dtype} on {device} "
          f"(built in {time.perf_counter() - start:.0f} s)")
    from lohakr import ModelLayout, load_adapter

    layout = ModelLayout.from_diffusers(**parts)
    report["adapters"] = {}
    for name, path in paths.items():  # lohakr first, so the peers' memory churn cannot slow it
        adapter = load_adapter(path)
        flops, bytes_min, layer_delta = adapter_cost(adapter, layout, dtype)
        # A VM's speed drifts by 2-3x within minutes: the bound uses the machine measured again
        # just before this adapter's runs (the start's figures are in report["roofline"]).
        now = machine_peaks(device)
        bound = max(flops / now["gemm_flops"], bytes_min / now["bandwidth"])
        ours = run_lohakr(parts, path, timer, args.reps, tag=f"{name}:")
        if device.startswith("cuda"):
            ours["originals_on_cpu"] = run_lohakr(parts, path, timer, args.reps, keep_originals_on="cpu",
                                                  tag=f"{name}:cpu:")
        report["adapters"][name] = {"modules": len(adapter), "file_mb": path.stat().st_size / 2**20, "flops": flops,
                                    "bytes_min": bytes_min, "roofline_now": now, "lower_bound_s": bound,
                                    "largest_layer_delta_bytes": layer_delta,
                                    "lohakr": ours}
        del adapter
    gc.collect()
    for name, path in paths.items():
        report["adapters"][name]["lycoris"] = {} if args.no_lycoris else run_lycoris(
            parts, path, timer, args.peer_reps, device, dtype, args.peer_warmup)
    summarize(report)
    if args.scaling:
        report["scaling"] = scaling(parts, timer, device, components)
    if "adapters" not in report["comfyui"]:
        print(f"\nComfyUI: {report['comfyui']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


def summarize(report: dict) -> None:
    """Print the figures of a run side by side and add the derived ones to ``report``: each load's
    own bound, the bounds measured in each cycle, the ratio a load at its own bound would have
    reached against LyCORIS. Also reprints a saved run (``--report``)."""
    for name, entry in report["adapters"].items():
        ours, peer, bound = entry["lohakr"], entry["lycoris"], entry["lower_bound_s"]
        now = entry["roofline_now"]
        # What faulting in a page costs beyond writing it (both rates with every thread): a
        # reversible load writes the patched weights to new storage, which the allocator may have
        # to fault in. Added to the bound, not overlapped: faults take the cores the work needs.
        fault_cost = 1 / now["first_touch_bandwidth"] - 1 / now["bandwidth"]
        new_storage = entry["bytes_min"] / 2
        entry["reversible_lower_bound_s"] = bound + new_storage * fault_cost
        print(f"\n{name}: {entry['modules']} modules, {entry['file_mb']:.0f} MB; lower bound {bound:.2f} s "
              f"({entry['flops'] / 1e9:.0f} GFLOP, {entry['bytes_min'] / 2**30:.2f} GiB moved; machine just before: "
              f"GEMM {now['gemm_flops'] / 1e9:.0f} GFLOP/s, copy {now['bandwidth'] / 1e9:.1f} GB/s, fresh memory "
              f"{now['first_touch_bandwidth'] / 1e9:.1f} GB/s); {entry['reversible_lower_bound_s']:.2f} s "
              "if every patched "
              f"weight went to memory never touched before (a load that reuses freed memory does not)")
        load_runs = ours["runs"]["load"]
        print(f"  lohakr   parse {fmt_s(ours['parse_s'])}  load+patch {fmt_s(ours['load_patch_s'])} "
              f"[{min(load_runs):.2f}..{max(load_runs):.2f}] ({ours['load_patch_s'] / bound:.2f}× bound, best run "
              f"{min(load_runs) / bound:.2f}×)  strength {fmt_s(ours['strength_s'])}  "
              f"unload {fmt_s(ours['unload_s'])}")
        cycles = [s / load for s, load in zip(ours["runs"]["strength"], load_runs, strict=False)]
        faults = ours["kernel"]["load"]
        print(f"           per load-strength-unload cycle: strength / load {statistics.median(cycles):.2f} "
              f"[{min(cycles):.2f}..{max(cycles):.2f}]; "
              f"a load's kernel CPU time {statistics.median(k for k, _ in faults):.2f} s "
              f"({statistics.median(n for _, n in faults) / 1e6:.2f} M page faults; a strength change's "
              f"{statistics.median(k for k, _ in ours['kernel']['strength']):.2f} s)")
        # Each load's own bound adds the pages it did fault in (at most the new storage).
        fault_s = [min(n * mmap.PAGESIZE, new_storage) * fault_cost for _, n in faults]
        ours["load_bounds_s"] = [bound + f for f in fault_s]
        own = [t / b for t, b in zip(load_runs, ours["load_bounds_s"], strict=False)]
        print(f"           each load against its own bound (the bound plus the extra cost of the pages it faulted "
              f"in, at the fresh-memory rate): {statistics.median(own):.2f}× [{min(own):.2f}..{max(own):.2f}]")
        # The roofline measured in each cycle, seconds from the steps it bounds: the GEMM rate
        # then, and a plain copy of the same weights (every kept original read, every live weight
        # written: the bytes a strength change must move; for fused loads, restoring the weights
        # from a snapshot). A VM's speed drifts 2-3x within minutes; this bound drifts with it.
        runs = ours["runs"]
        no_faults = [0.0] * len(fault_s)
        in_cycle = {}
        for step, copy_step, rates, extra in (
                ("load", "copy", ours["cycle_gemm_flops"], fault_s),
                ("strength", "copy", ours["cycle_gemm_flops"], no_faults),
                ("fused", "fused_restore", ours.get("fused_cycle_gemm_flops", []), no_faults)):
            copies = runs.get(copy_step, [])
            bounds = [max(entry["flops"] / rate, copy) + e
                      for rate, copy, e in zip(rates, copies, extra, strict=False)]
            in_cycle[step] = [t / b for t, b in zip(runs.get(step, []), bounds, strict=False)]
        ours["in_cycle_bound_ratios"] = in_cycle
        print("           against the roofline measured in the same cycle (its GEMM rate, median "
              f"{statistics.median(ours['cycle_gemm_flops']) / 1e9:.0f} GFLOP/s, "
              "and a plain copy of the same weights, "
              f"median {ours['same_bytes_copy_s']:.2f} s; loads: plus their page faults): "
              + ", ".join(f"{step} {statistics.median(r):.2f}× [{min(r):.2f}..{max(r):.2f}]"
                          for step, r in in_cycle.items() if r))
        working = ours["peak_extra_bytes"] - ours["kept_originals_bytes"]
        print(f"           peak +{ours['peak_extra_bytes'] / 2**30:.2f} GiB = "
              f"originals {ours['kept_originals_bytes'] / 2**30:.2f} GiB "
              f"{'+' if working >= 0 else '-'} {abs(working) / 2**20:.0f} MiB (largest layer's float32 ΔW: "
              f"{entry['largest_layer_delta_bytes'] / 2**20:.0f} MiB)")
        print(f"  lohakr, fuse=True (nothing kept): load+patch {fmt_s(ours['fused_load_s'])} "
              f"({ours['fused_load_s'] / bound:.2f}× bound)  peak +{ours['fused_peak_extra_bytes'] / 2**20:.0f} MiB;"
              f"  strength change vs bound {ours['strength_s'] / bound:.2f}×")
        if "originals_on_cpu" in ours:
            other = ours["originals_on_cpu"]
            print(f"  lohakr, originals kept on the CPU: load+patch {fmt_s(other['load_patch_s'])}  strength "
                  f"{fmt_s(other['strength_s'])}  unload {fmt_s(other['unload_s'])}")
        if peer.get("load_patch_s"):
            # LyCORIS' time includes reading the file: ours gets the parse added for the ratio.
            # Its merge writes in place; a reversible load writes new storage and pays for the
            # pages it faults in: the ratio a load exactly at its own bound would have reached
            # says how much of a shortfall is the machine's fresh memory, not the loader.
            at_bound = peer["load_patch_s"] / (ours["parse_s"] + statistics.median(ours["load_bounds_s"]))
            peer["ratio_at_own_bound"] = at_bound
            print(f"  LyCORIS  load_file + create_network_from_weights + merge_to {fmt_s(peer['load_patch_s'])} "
                  f"({peer['load_patch_s'] / (ours['parse_s'] + ours['load_patch_s']):.1f}× lohakr parse + load, "
                  f"{peer['load_patch_s'] / (ours['parse_s'] + ours['fused_load_s']):.1f}× parse + fused; "
                  f"{at_bound:.1f}× for a load at its own bound)  peak +{peer['peak_extra_bytes'] / 2**30:.2f} GiB")
        elif peer:
            print(f"  LyCORIS  {peer.get('error')}")
        comfy = report.get("comfyui", {}).get("adapters", {}).get(name)
        if comfy:
            native = fmt_s(comfy.get("native_s", comfy.get("native_error")))
            print(f"  ComfyUI  patch_model: native LoraLoader {native}, "
                  f"lohakr nodes {fmt_s(comfy.get('lohakr_s'))}")
            if "native_peak_bytes" in comfy and "lohakr_peak_bytes" in comfy:
                print("           peak memory during patch_model: "
                      f"native +{comfy['native_peak_bytes'] / 2**30:.2f} GiB, "
                      f"lohakr nodes +{comfy['lohakr_peak_bytes'] / 2**30:.2f} GiB (default allocator)")
            live = report["comfyui"].get("live_memory", {}).get(name, {})
            if "native_peak_bytes" in live and "lohakr_peak_bytes" in live:
                print(f"           memory held while patching (1 MiB mmap threshold): native "
                      f"+{live['native_peak_bytes'] / 2**20:.0f} MiB, "
                      f"lohakr nodes +{live['lohakr_peak_bytes'] / 2**20:.0f} MiB"
                      f" (largest layer's float32 ΔW {entry['largest_layer_delta_bytes'] / 2**20:.0f} MiB)")


def scaling(parts, timer, device, components: tuple[str, ...] = PARTS["all"]) -> dict:
    """Load+patch time against LoHa rank (linear modules) and against the number of stacked adapters."""
    import lohakr

    out = {"rank": {}, "stack": {}}
    pipe = lohakr.enable(SimpleNamespace(**parts, _progress_bar_config={"disable": True}))
    for rank in (4, 8, 16, 32, 64, 128):
        path = make_adapter_file(f"loha_r{rank}", dict(algo="loha", network_dim=rank, network_alpha=rank / 2,
                                                       conv_dim=0, conv_alpha=0), components)
        adapter = lohakr.load_adapter(path)
        t, _ = timer(lambda adapter=adapter: pipe.load_lycoris(adapter, "r"), setup=lambda: pipe.unload_lycoris(),
                     reps=1)
        pipe.unload_lycoris()
        out["rank"][rank] = t
        print(f"  scaling: LoHa rank {rank:3d}: load+patch {t:6.2f} s")
    adapter = lohakr.load_adapter(make_adapter_file("loha_r16", dict(algo="loha", network_dim=16, network_alpha=8,
                                                                      conv_dim=0, conv_alpha=0), components))
    for count in (1, 2, 4, 8):
        def one_by_one(count=count):
            for i in range(count):
                pipe.load_lycoris(adapter, f"s{i}", strength=1 / count)

        def batched():
            with pipe.lycoris_batch():
                one_by_one()

        t_batch, _ = timer(batched, setup=lambda: pipe.unload_lycoris(), reps=1)
        pipe.unload_lycoris()
        t_each, _ = timer(one_by_one, setup=lambda: pipe.unload_lycoris(), reps=1, warmup=0)
        pipe.unload_lycoris()
        out["stack"][count] = {"batch_s": t_batch, "one_by_one_s": t_each}
        print(f"  scaling: {count} stacked LoHa r16: load+patch all in one lycoris_batch() {t_batch:6.2f} s, "
              f"one load_lycoris() after another {t_each:6.2f} s")
    return out


if __name__ == "__main__":
    sys.exit(main())
