"""``python -m lohakr demo``: load a LoHa and a LoKr into an SDXL pipeline through
``pipe.load_loha`` / ``pipe.load_lokr`` at a few strengths, save a before/after grid, print reports.

With no arguments everything is embedded: a tiny SDXL-structured pipeline built from config with
seeded random weights, and two adapters made on the spot for its layers (kohya names: SGM UNet,
``text_model_`` CLIP). ``--pipeline DIR`` and ``--adapter FILE`` use your own.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .names import ModelLayout


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="lohakr-demo.png", help="where to save the grid (PNG)")
    parser.add_argument("--pipeline", help="a local diffusers SDXL/SD1.5 pipeline folder (default: tiny, built in)")
    parser.add_argument("--adapter", action="append", default=[],
                        help="a LoHa/LoKr .safetensors file (repeatable; default: one LoHa and one LoKr made now)")
    parser.add_argument("--strengths", default="0,0.5,1,1.5", help="comma-separated strengths for the columns")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at sunset")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 8 tiny, 25 real)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 64 tiny, 1024/512 real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS' split of a dimension into (small, large) Kronecker blocks (docs/format.md#factorization)."""
    limit = dimension if factor < 0 else factor
    if factor > 0 and dimension % factor == 0:
        return tuple(sorted((factor, dimension // factor)))  # type: ignore[return-value]
    best = 1
    for m in range(1, int(math.isqrt(dimension)) + 1):
        if dimension % m == 0 and m <= limit:
            best = m
    return best, dimension // best


def make_demo_adapter(layout: ModelLayout, kind: str, *, rank: int = 4, seed: int = 0,
                      magnitude: float = 0.6) -> dict[str, torch.Tensor]:
    """A LoHa (Tucker on k×k convs) or LoKr (low-rank w2) state dict for every layer of ``layout``,
    named as kohya names them. ``magnitude`` sets ‖ΔW‖ relative to each layer's ‖W‖."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for target in layout.targets.values():
        shape = target.weight_shape
        name = _kohya_name(target, layout)
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        if kind == "loha":
            if kernel and any(k != 1 for k in kernel):
                parts = {"hada_t1": (rank, rank, *kernel), "hada_w1_a": (rank, out_dim), "hada_w1_b": (rank, in_dim),
                         "hada_t2": (rank, rank, *kernel), "hada_w2_a": (rank, out_dim), "hada_w2_b": (rank, in_dim)}
            else:
                flat = in_dim * math.prod(kernel)
                parts = {"hada_w1_a": (out_dim, rank), "hada_w1_b": (rank, flat),
                         "hada_w2_a": (out_dim, rank), "hada_w2_b": (rank, flat)}
        else:
            (a, b), (c, d) = factorization(out_dim), factorization(in_dim)
            parts = {"lokr_w1": (a, c), "lokr_w2_a": (b, rank), "lokr_w2_b": (rank, d * math.prod(kernel))}
        for suffix, part_shape in parts.items():
            tensors[f"{name}.{suffix}"] = torch.randn(part_shape, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    _normalise(tensors, layout, magnitude)
    return tensors


def _kohya_name(target, layout: ModelLayout) -> str:
    if target.component == "unet":
        path = target.sgm_path if layout.family == "sdxl" and target.sgm_path else target.path
        return "lora_unet_" + path.replace(".", "_")
    prefix = {"text_encoder": "lora_te1_" if layout.family == "sdxl" else "lora_te_",
              "text_encoder_2": "lora_te2_"}[target.component]
    path = target.path if target.path.startswith("text_model.") else "text_model." + target.path
    return prefix + path.replace(".", "_")


def _normalise(tensors: dict[str, torch.Tensor], layout: ModelLayout, magnitude: float) -> None:
    """Scale one factor per module so ‖ΔW‖ = magnitude·‖W‖ (a visible, sane effect)."""
    from .adapter import load_adapter

    adapter = load_adapter(tensors)
    for name, module in adapter.modules.items():
        target = layout.resolve(name)
        weight_norm = float(target.layer.weight.detach().float().norm()) if target.layer is not None else 1.0
        delta_norm = float(module.delta(target.weight_shape).norm())
        key = f"{name}.hada_w1_a" if module.kind == "loha" else f"{name}.lokr_w1"
        if delta_norm > 0:
            tensors[key].mul_(magnitude * weight_norm / delta_norm)


def _build_pipeline(args: argparse.Namespace, workdir: Path, device: str):
    if args.pipeline:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, local_files_only=True)
        return pipe.to(device), False
    from . import tiny_models

    return tiny_models.make_sdxl_pipeline(workdir / "tokenizer").to(device), True


def run_demo(args: argparse.Namespace) -> int:
    from PIL import Image, ImageDraw
    from safetensors.torch import save_file

    from .diffusers_pipeline import enable, pipeline_layout

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pipe, tiny = _build_pipeline(args, workdir, device)
        enable(pipe)
        pipe.set_progress_bar_config(disable=True)
        steps = args.steps or (8 if tiny else 25)
        size = args.size or (64 if tiny else (1024 if getattr(pipe, "text_encoder_2", None) is not None else 512))
        adapters: list[tuple[str, str]] = []  # (path, method)
        if args.adapter:
            adapters = [(path, "load_lycoris") for path in args.adapter]
        else:
            layout = pipeline_layout(pipe)
            for kind in ("loha", "lokr"):
                path = workdir / f"demo_{kind}.safetensors"
                save_file(make_demo_adapter(layout, kind, seed=1 if kind == "loha" else 2), str(path),
                          {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0",
                           "ss_network_args": json.dumps({"algo": kind})})
                adapters.append((str(path), f"load_{kind}"))
        print(f"pipeline: {'tiny SDXL (built from config)' if tiny else args.pipeline} on {device}, "
              f"{steps} steps, {size}×{size}")

        def render() -> Image.Image:
            g = torch.Generator(device="cpu").manual_seed(args.seed)
            return pipe(args.prompt, num_inference_steps=steps, height=size, width=size, generator=g).images[0]

        rows: list[tuple[str, list[Image.Image]]] = []
        for path, method in adapters:
            name = Path(path).stem
            t0 = time.perf_counter()
            report = getattr(pipe, method)(path, name, strength=strengths[0])
            load_time = time.perf_counter() - t0
            print(f"\n{report.format(names=5)}\n  loaded in {load_time:.2f} s")
            images = []
            for strength in strengths:
                pipe.set_lycoris_strength(name, strength)
                images.append(render())
            pipe.unload_lycoris(name)
            base = images[strengths.index(0.0)] if 0.0 in strengths else None
            if base is not None:
                import numpy as np

                diffs = [float(np.abs(np.asarray(im, dtype=np.float32) - np.asarray(base, dtype=np.float32)).mean())
                         for im in images]
                print("  mean |pixel change| vs strength 0: "
                      + ", ".join(f"{s:g}: {d:.1f}" for s, d in zip(strengths, diffs, strict=True)))
            rows.append((name, images))
        grid = _grid(rows, strengths, Image, ImageDraw)
        out = Path(args.out)
        grid.save(out)
    print(f"\nsaved {out} ({grid.width}×{grid.height}) in {time.perf_counter() - started:.1f} s")
    return 0


def _grid(rows: list[tuple[str, list[Any]]], strengths: list[float], image_module, draw_module):
    cell = max(128, rows[0][1][0].width if rows and rows[0][1] else 128)
    label_w, label_h = 150, 20
    grid = image_module.new("RGB", (label_w + cell * len(strengths), label_h + cell * len(rows)), "white")
    draw = draw_module.Draw(grid)
    for j, strength in enumerate(strengths):
        draw.text((label_w + j * cell + 4, 4), f"strength {strength:g}", fill="black")
    for i, (name, images) in enumerate(rows):
        draw.text((4, label_h + i * cell + cell // 2), name[:22], fill="black")
        for j, image in enumerate(images):
            grid.paste(image.resize((cell, cell), image_module.NEAREST), (label_w + j * cell, label_h + i * cell))
    return grid
