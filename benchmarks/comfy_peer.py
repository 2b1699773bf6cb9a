"""ComfyUI side of the benchmark, run in ComfyUI's own environment (a subprocess of patch_sdxl.py):
full-size SDXL built with ComfyUI's classes (seeded random weights), then the same files patched by
ComfyUI's native LoraLoader path and by our nodes, timing ComfyUI's patch_model (where the weights
are actually patched). Prints one JSON line.

    python benchmarks/comfy_peer.py COMFYUI_DIR fp16 REPS WARMUP '{"name": "path", ...}'
"""

import json
import os
import statistics
import sys
import time

comfy_dir, dtype_name = sys.argv[1], sys.argv[2]
reps, warmup, files = int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
sys.path.insert(0, comfy_dir)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

args.cpu = not torch.cuda.is_available()
import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "dtype": dtype, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
        "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
        "use_temporal_resblock": False}


def build():
    config = comfy.supported_models.SDXL(dict(UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "model.", device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.empty(p.shape).normal_(0, 0.02, generator=g))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def timed_patch(patcher):
    """Median, min and max of ``reps`` timed patch_model calls after ``warmup`` untimed ones, and
    the largest rise of resident memory (or CUDA allocation) during one."""
    times, peaks = [], []
    for i in range(warmup + reps):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            base = _status_bytes("VmRSS")
        start = time.perf_counter()
        patcher.patch_model(device_to=mm.get_torch_device())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_bytes("VmHWM")
            peaks.append(peak - base)
        patcher.unpatch_model(device_to=patcher.offload_device)
    return statistics.median(times), min(times), max(times), max(peaks)


from lohakr.nodes.comfy_bridge import StackItem, apply_stack  # noqa: E402

base = build()
result = {"adapters": {}}
for name, path in files.items():
    figures = {}
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    try:
        native, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
        figures["native_s"], figures["native_min_s"], figures["native_max_s"], figures["native_peak_bytes"] = \
            timed_patch(native)
    except Exception as err:  # noqa: BLE001 - report the peer's failure
        figures["native_error"] = f"{type(err).__name__}: {str(err)[:160]}"
    ours, _, _ = apply_stack(base, None, [StackItem(path, 1.0, 0.0)])
    figures["lohakr_s"], figures["lohakr_min_s"], figures["lohakr_max_s"], figures["lohakr_peak_bytes"] = \
        timed_patch(ours)
    result["adapters"][name] = figures
print(json.dumps(result))
