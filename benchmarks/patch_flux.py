"""Flux.1 at full width: what a fused original name costs. The same LoKr / LoHa updates, once named
as diffusers' split layers (SimpleTuner's ``lycoris_`` names) and once as BFL's fused layers (kohya
``lora_unet_`` names: ``img_attn.qkv`` and ``linear1`` are split onto diffusers' to_q/to_k/to_v and
proj_mlp from sliced factors), loaded by lohakr into diffusers' FluxTransformer2DModel; LyCORIS'
own merge of the diffusers-named file beside it.

    python benchmarks/patch_flux.py                  # 3 double + 6 single blocks, bf16, 3 repetitions
    python benchmarks/patch_flux.py --double 19 --single 38   # the whole Flux.1-dev (needs ~50 GB)

The model has FLUX.1-dev's widths (hidden 3072, MLP 12288) and fewer blocks (every block is alike,
so time per block carries over), seeded random bf16 weights. Files: LyCORIS made on meta-device
copies of the model and of its BFL layout, factors randomised: LoKr as SimpleTuner configures it
(factor 16, full w2, ``linear_dim`` 10000) and LoHa dim 32 / alpha 16. Cached in benchmarks/.cache.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from patch_sdxl import CACHE, Timer, fmt_s  # noqa: E402

ADAPTERS = {
    "lokr_f16_full": dict(algo="lokr", linear_dim=10000, linear_alpha=1, factor=16),
    "loha_d32": dict(algo="loha", linear_dim=32, linear_alpha=16),
}


def flux_config(double: int, single: int) -> dict:
    from lohakr.loaders.reference_models import TRANSFORMERS

    return {**TRANSFORMERS["flux1"][1], "num_layers": double, "num_single_layers": single}


def build_model(double: int, single: int, device: str = "cpu", seed: int = 0):
    """FluxTransformer2DModel at full width, seeded random bf16 weights (or on the meta device)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**flux_config(double, single)).to(torch.bfloat16)
    if device == "meta":
        return model
    model = model.to_empty(device=device)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            flat = parameter.view(-1)
            for start in range(0, flat.numel(), 1 << 24):
                chunk = flat[start:start + (1 << 24)]
                chunk.copy_(torch.randn(chunk.numel(), generator=generator).mul_(0.02))
    return model.eval().requires_grad_(False)


def original_tree(model) -> tuple[torch.nn.Module, dict[str, str]]:
    """BFL's layout of ``model`` as meta Linears (from the family table), and original → kohya name."""
    from lohakr.loaders.families import FAMILIES
    from lohakr.loaders.names import ModelLayout, _original_names, patchable_layers

    layout = ModelLayout.from_transformer(model, FAMILIES["flux1"])
    root, names = torch.nn.Module(), {}
    paths = [path + "." for path, _ in patchable_layers(model)]
    for original, _ in _original_names(FAMILIES["flux1"], paths):
        parts = layout.resolve_parts(original)
        if parts is None:
            continue
        rows = sum(part.height for part in parts)
        width = parts[0].target.weight_shape[1]
        holder = root
        *outer, leaf = original.split(".")
        for name in outer:
            if not hasattr(holder, name):
                holder.add_module(name, torch.nn.Module())
            holder = getattr(holder, name)
        with torch.device("meta"):
            holder.add_module(leaf, torch.nn.Linear(width, rows, bias=False, dtype=torch.bfloat16))
        names["lycoris_" + original.replace(".", "_")] = "lora_unet_" + original.replace(".", "_")
    return root, names


def write_file(module: torch.nn.Module, config: dict, path: Path, renames: dict[str, str] | None, seed: int) -> None:
    """LyCORIS on a meta module tree, factors materialised and randomised, saved (bf16) under ``renames``."""
    from lycoris import LycorisNetwork, create_lycoris
    from safetensors.torch import save_file

    kw = dict(config)
    saved = {k: getattr(LycorisNetwork, k) for k in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV")}
    LycorisNetwork.apply_preset({"target_module": ["Linear"], "target_name": [], "enable_conv": False})
    try:
        net = create_lycoris(module, 1.0, linear_dim=kw.pop("linear_dim"), linear_alpha=kw.pop("linear_alpha"), **kw)
    finally:
        for key, value in saved.items():
            setattr(LycorisNetwork, key, value)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for lora in net.loras:
        name = renames[lora.lora_name] if renames else lora.lora_name
        for key, value in lora.state_dict().items():
            if key == "alpha":
                tensors[f"{name}.alpha"] = torch.tensor(float(config["linear_alpha"]))
            elif not key.startswith("org_"):
                tensors[f"{name}.{key}"] = (torch.randn(value.shape, generator=generator) * 0.05).to(torch.bfloat16)
    save_file(tensors, str(path), {"ss_network_module": "lycoris.kohya"})


def adapter_files(double: int, single: int) -> dict[str, Path]:
    """``{adapter}_{naming}`` → cached file, for both namings of each adapter (same seed, same factors
    per layer where the fused layer is one module: values differ between namings, shapes are real)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, config in ADAPTERS.items():
        for naming in ("diffusers", "bfl"):
            path = CACHE / f"flux_{double}x{single}_{name}_{naming}.safetensors"
            if not path.exists():
                model = build_model(double, single, "meta")
                if naming == "diffusers":
                    write_file(model, config, path, None, seed=1)
                else:
                    tree, renames = original_tree(model)
                    write_file(tree, config, path, renames, seed=1)
            files[f"{name}_{naming}"] = path
    return files


def touched_bytes(model, adapter) -> int:
    from lohakr.loaders.families import FAMILIES
    from lohakr.loaders.names import ModelLayout
    from lohakr.loaders.resolve import resolve

    layout = ModelLayout.from_transformer(model, FAMILIES["flux1"])
    layers = {m.target.key: m.target.layer for m in resolve(adapter, layout)[0]}
    return sum(layer.weight.numel() * layer.weight.element_size() for layer in layers.values())


def run_lohakr(model, path: Path, timer: Timer, reps: int) -> dict:
    import lohakr

    pipe = lohakr.enable(SimpleNamespace(transformer=model, _progress_bar_config={"disable": True}))
    adapter = lohakr.load_adapter(path)
    touched = touched_bytes(model, adapter)

    def copy_same_bytes():
        """Read and write every touched weight once: the memory traffic of any patch, same cycle."""
        with torch.no_grad():
            for kept in pipe.__dict__["_lohakr_patcher"].originals.values():
                kept.target.layer.weight.copy_(kept.weight)

    cycle = timer.cycle([("load", lambda: pipe.load_lycoris(adapter, "bench")),
                         ("copy", copy_same_bytes),
                         ("strength", lambda: pipe.set_lycoris_strength("bench", 0.5)),
                         ("unload", lambda: pipe.unload_lycoris("bench"))], reps=reps, tag=path.stem + ":")
    report = pipe.load_lycoris(adapter, "bench")
    pieces = sum(1 for a in pipe.__dict__["_lohakr_patcher"] for m in a.matches)
    pipe.unload_lycoris()
    gc.collect()
    return {"load_s": cycle["load"][0], "strength_s": cycle["strength"][0], "unload_s": cycle["unload"][0],
            "copy_s": cycle["copy"][0], "peak_extra_bytes": cycle["load"][1], "touched_bytes": touched,
            "modules": len(report.applied), "patches": pieces}


def run_lycoris(model, path: Path, timer: Timer, reps: int) -> dict:
    """LyCORIS' own merge of a ``lycoris_`` file into the diffusers model (what SimpleTuner users run)."""
    from lycoris import create_lycoris_from_weights

    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore():
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(snapshot[key])

    def merge():
        network, _ = create_lycoris_from_weights(1.0, str(path), model)
        network.merge_to(1.0)

    try:
        total, peak = timer(merge, setup=restore, reps=reps, label=f"lycoris:{path.name}")
        result = {"load_s": total, "peak_extra_bytes": peak}
    except Exception as err:  # noqa: BLE001 - a peer failing is a result to report
        result = {"error": f"{type(err).__name__}: {str(err)[:160]}"}
    restore()
    snapshot.clear()
    gc.collect()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--double", type=int, default=3)
    parser.add_argument("--single", type=int, default=6)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-lycoris", action="store_true", help="skip LyCORIS' merge")
    parser.add_argument("--report", type=Path, default=CACHE / "patch_flux.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    files = adapter_files(args.double, args.single)
    model = build_model(args.double, args.single)
    params = sum(p.numel() for p in model.parameters())
    print(f"FluxTransformer2DModel, {args.double} double + {args.single} single blocks at full width: "
          f"{params / 1e9:.2f} B parameters, bf16; {torch.get_num_threads()} threads")
    timer = Timer("cpu", warmup=1)
    results = {"double": args.double, "single": args.single, "parameters": params, "runs": {}}
    for key, path in files.items():
        result = run_lohakr(model, path, timer, args.reps)
        results["runs"][f"lohakr:{key}"] = result
        print(f"lohakr  {key:24s} load {fmt_s(result['load_s'])}  strength {fmt_s(result['strength_s'])}  "
              f"unload {fmt_s(result['unload_s'])}  copy of the same bytes {fmt_s(result['copy_s'])}  "
              f"({result['modules']} modules → {result['patches']} patches, {result['touched_bytes'] / 2**30:.2f} "
              f"GiB touched, +{result['peak_extra_bytes'] / 2**20:.0f} MiB peak)")
        if key.endswith("_diffusers") and not args.no_lycoris:
            peer = run_lycoris(model, path, timer, args.reps)
            results["runs"][f"lycoris:{key}"] = peer
            print(f"LyCORIS {key:24s} " + (f"merge {fmt_s(peer['load_s'])}" if "load_s" in peer else peer["error"]))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps({**results, "timer_runs": timer.runs}, indent=1))
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
