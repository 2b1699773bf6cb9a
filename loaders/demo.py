"""``python -m lohakr demo``: load a LoHa and a LoKr into an SDXL pipeline through
``pipe.load_loha`` / ``pipe.load_lokr``, change their strength with ``set_lycoris_strength``, unload them
(every weight must come back bit for bit), print the reports and save a figure: per adapter and strength
the output beside a heat map of its change from the output without adapter, and a per-block bar chart of
the relative weight change read off the live weights.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .names import ModelLayout


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="lohakr-demo.png", help="where to save the figure (PNG)")
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
                      magnitude: float | Callable[[str], float] = 0.6) -> dict[str, torch.Tensor]:
    """A LoHa (Tucker on k×k convs) or LoKr (low-rank w2) state dict for every layer of ``layout``,
    named as kohya names them. ``magnitude`` sets ‖ΔW‖ relative to each layer's ‖W‖: a number, or a
    function of the layer's block (``"IN04"``, ``"TE1"``…) to give the adapter a per-block profile."""
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


def _normalise(tensors: dict[str, torch.Tensor], layout: ModelLayout,
               magnitude: float | Callable[[str], float]) -> None:
    """Scale one factor per module so ‖ΔW‖ = magnitude·‖W‖ (a visible, sane effect)."""
    from .adapter import load_adapter

    adapter = load_adapter(tensors)
    for name, module in adapter.modules.items():
        target = layout.resolve(name)
        weight_norm = float(target.layer.weight.detach().float().norm()) if target.layer is not None else 1.0
        delta_norm = float(module.delta(target.weight_shape).norm())
        key = f"{name}.hada_w1_a" if module.kind == "loha" else f"{name}.lokr_w1"
        scale = magnitude(target.block) if callable(magnitude) else magnitude
        if delta_norm > 0:
            tensors[key].mul_(scale * weight_norm / delta_norm)


def _build_pipeline(args: argparse.Namespace, workdir: Path, device: str):
    if args.pipeline:
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, local_files_only=True)
        return pipe.to(device), False
    from . import tiny_models

    return tiny_models.make_sdxl_pipeline(workdir / "tokenizer").to(device), True


def _unet_position(block: str) -> float | None:
    """Where a UNet block sits along the UNet, 0 (IN00) … 1 (OUT08); ``None`` outside the IN/M/OUT chain."""
    order = [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    if block not in order:
        return None
    return order.index(block) / 24


def loha_profile(block: str) -> float:
    """The demo LoHa's ‖ΔW‖/‖W‖ at strength 1: rising along the UNet, weak on the text encoders."""
    position = _unet_position(block)
    return 0.2 if position is None else 0.15 + 0.75 * position


def lokr_profile(block: str) -> float:
    """The demo LoKr's ‖ΔW‖/‖W‖ at strength 1: falling along the UNet, strong on the text encoders."""
    position = _unet_position(block)
    return 0.6 if position is None else 0.9 - 0.75 * position


DEMO_ADAPTERS = {"loha": (1, loha_profile), "lokr": (2, lokr_profile)}  # kind → (seed, per-block magnitude)


def _snapshot(layout: ModelLayout) -> dict[str, torch.Tensor]:
    """A CPU copy of every patchable weight, to measure the change and check the unload against."""
    return {key: t.layer.weight.detach().to("cpu", copy=True) for key, t in layout.targets.items()
            if t.layer is not None}


def _block_change(layout: ModelLayout, originals: dict[str, torch.Tensor]) -> dict[str, float]:
    """block → ‖W − W₀‖ / ‖W₀‖ over the block's weights, read off the live model."""
    changed: dict[str, float] = {}
    total: dict[str, float] = {}
    for key, original in originals.items():
        target = layout.targets[key]
        weight = target.layer.weight.detach().to("cpu", torch.float64)
        changed[target.block] = changed.get(target.block, 0.0) + float((weight - original.double()).square().sum())
        total[target.block] = total.get(target.block, 0.0) + float(original.double().square().sum())
    return {block: math.sqrt(changed[block] / total[block]) if total[block] else 0.0 for block in changed}


def _restored(layout: ModelLayout, originals: dict[str, torch.Tensor]) -> int:
    """How many weights equal their original bit for bit."""
    return sum(torch.equal(layout.targets[key].layer.weight.detach().cpu(), original)
               for key, original in originals.items())


class _Result:
    """One adapter's run: its report, the output and per-block weight change at each strength."""

    def __init__(self, name: str, label: str, report: Any, load_time: float):
        self.name, self.label, self.report, self.load_time = name, label, report, load_time
        self.images: list[Any] = []
        self.changes: list[dict[str, float]] = []
        self.restored = 0


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo (``python -m lohakr demo``); torch's thread count is as before when it returns."""
    threads = torch.get_num_threads()
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)


def _run_demo(args: argparse.Namespace) -> int:
    import numpy as np
    from safetensors.torch import save_file

    from .adapter import KIND_NAMES
    from .diffusers_pipeline import enable, pipeline_layout

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if not args.pipeline and device == "cpu":
            # The tiny models' layers are too small to gain from threads, and when the cores are busy with other
            # work, threads spinning while they wait on each other make it many times slower. Restored on return.
            torch.set_num_threads(1)
        pipe, tiny = _build_pipeline(args, workdir, device)
        enable(pipe)
        pipe.set_progress_bar_config(disable=True)
        steps = args.steps or (8 if tiny else 25)
        size = args.size or (64 if tiny else (1024 if getattr(pipe, "text_encoder_2", None) is not None else 512))
        layout = pipeline_layout(pipe)
        adapters: list[tuple[str, str]] = []  # (path, method)
        if args.adapter:
            adapters = [(path, "load_lycoris") for path in args.adapter]
        else:
            for kind, (seed, profile) in DEMO_ADAPTERS.items():
                path = workdir / f"demo_{kind}.safetensors"
                save_file(make_demo_adapter(layout, kind, seed=seed, magnitude=profile), str(path),
                          {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sdxl_base_v1-0",
                           "ss_network_args": json.dumps({"algo": kind})})
                adapters.append((str(path), f"load_{kind}"))
        print(f"pipeline: {'tiny SDXL (built from config, random weights)' if tiny else args.pipeline} on {device}, "
              f"{steps} steps, {size}×{size}")

        def render() -> np.ndarray:
            g = torch.Generator(device="cpu").manual_seed(args.seed)
            image = pipe(args.prompt, num_inference_steps=steps, height=size, width=size, generator=g).images[0]
            return np.asarray(image.convert("RGB"))

        originals = _snapshot(layout)
        base = render()  # no adapter loaded: what every difference is measured against
        results: list[_Result] = []
        for path, method in adapters:
            name = Path(path).stem
            t0 = time.perf_counter()
            report = getattr(pipe, method)(path, name, strength=strengths[0])
            kinds = sorted({o.kind for o in report.applied if o.kind}, key=list(KIND_NAMES).index)
            result = _Result(name, " + ".join(KIND_NAMES[k] for k in kinds) or "nothing", report,
                             time.perf_counter() - t0)
            print(f"\n{report.format(names=5)}\n  loaded in {result.load_time:.2f} s")
            for strength in strengths:
                pipe.set_lycoris_strength(name, strength)
                result.images.append(render())
                result.changes.append(_block_change(layout, originals))
            pipe.unload_lycoris(name)
            result.restored = _restored(layout, originals)
            print("  mean |pixel change| vs no adapter: " + ", ".join(
                f"{s:g}: {_mean_change(image, base):.1f}" for s, image in zip(strengths, result.images, strict=True)))
            print("  relative weight change |W-W0|/|W0| (largest block): " + ", ".join(
                f"{s:g}: {max(c.values(), default=0.0):.0%}" for s, c in zip(strengths, result.changes, strict=True)))
            print(f"  unloaded: {result.restored}/{len(originals)} weights restored bit for bit")
            results.append(result)
        identical = bool(np.array_equal(render(), base))
        print(f"\noutput after unloading everything: {'identical to' if identical else 'DIFFERENT from'} "
              "the output before loading")
        figure = _figure(results, strengths, base, layout.blocks, len(originals), identical,
                         f"{'tiny SDXL, random weights' if tiny else Path(args.pipeline).name}, {steps} steps, "
                         f"{size}x{size}, prompt \"{args.prompt}\"",
                         "" if args.adapter else "The two demo adapters are made with different per-block profiles "
                         "(the LoHa grows along the UNet, the LoKr shrinks); the bars read them back off the live "
                         "weights.")
        out = Path(args.out)
        figure.save(out)
    print(f"\nsaved {out} ({figure.width}×{figure.height}) in {time.perf_counter() - started:.1f} s")
    ok = identical and all(r.restored == len(originals) for r in results)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# The figure (PIL only)
# ------------------------------------------------------------------------------------------------
HEAT_FULL = 32  # a pixel change (mean over R, G, B, in 0…255 levels) drawn at full heat
HEAT_STOPS = [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)]  # inferno-like
STRENGTH_COLOURS = [(158, 202, 225), (66, 146, 198), (8, 81, 156), (8, 48, 107), (120, 120, 120)]
INK, GREY, LIGHT = (20, 20, 20), (110, 110, 110), (225, 225, 225)


def _mean_change(image, base) -> float:
    import numpy as np

    return float(np.abs(image.astype(np.float32) - base.astype(np.float32)).mean())


def _heat_lut():
    import numpy as np

    stops = np.array(HEAT_STOPS, dtype=np.float32)
    x = np.linspace(0, len(stops) - 1, 256)
    return np.stack([np.interp(x, np.arange(len(stops)), stops[:, c]) for c in range(3)], axis=1).astype(np.uint8)


def _heat(image, base):
    """|image − base| (mean over RGB), HEAT_FULL levels → full heat, as an RGB array."""
    import numpy as np

    change = np.abs(image.astype(np.float32) - base.astype(np.float32)).mean(axis=2)
    return _heat_lut()[np.clip(change * (255 / HEAT_FULL), 0, 255).astype(np.uint8)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _strength_colour(strengths: list[float], strength: float) -> tuple[int, int, int] | None:
    """Bar colour of a strength (light → dark as it grows); ``None`` for 0."""
    ordered = sorted({s for s in strengths if s != 0})
    if strength == 0:
        return None
    return STRENGTH_COLOURS[min(ordered.index(strength), len(STRENGTH_COLOURS) - 1)]


def _block_label(block: str) -> str:
    if block.startswith("OUT") or block.startswith("IN"):
        return str(int(block[-2:]))
    return {"M00": "0", "TE": "TE", "TE1": "1", "TE2": "2", "OTHER": ""}.get(block, block[:3])


class FigureLayout:
    """Where everything goes in the demo figure: adapter ``i``'s section, its tiles per strength ``j``."""

    margin, label_w, gap, chart_w, min_width = 20, 118, 10, 520, 1160  # min_width: the header's lines fit

    def __init__(self, n_adapters: int, n_strengths: int, cell: int, note: bool):
        self.cell, self.col_w = cell, cell + self.gap
        self.images_w = self.label_w + n_strengths * self.col_w
        self.section_h = 30 + 22 + cell + 6 + cell + 24 + 16
        self.title_h, self.footer_h = 82 + (18 if note else 0), 80
        self.width = max(self.margin * 2 + self.images_w + 20 + self.chart_w, self.min_width)
        self.height = self.title_h + n_adapters * self.section_h + self.footer_h

    def section_top(self, i: int) -> int:
        return self.title_h + i * self.section_h

    def tile(self, i: int, j: int, heat: bool = False) -> tuple[int, int, int, int]:
        """The box of adapter ``i``'s output (or heat map) at the ``j``-th strength."""
        x = self.margin + self.label_w + j * self.col_w
        y = self.section_top(i) + 52 + (self.cell + 6 if heat else 0)
        return x, y, x + self.cell, y + self.cell

    def chart(self, i: int) -> tuple[int, int, int, int]:
        top = self.section_top(i) + 30
        return self.margin + self.images_w + 20, top, self.width - self.margin, top + 22 + 2 * self.cell + 24

    @staticmethod
    def cell_for(image_width: int) -> int:
        return 128 if image_width <= 128 else 256


def _figure(results: list[_Result], strengths: list[float], base, blocks: list[str], n_weights: int,
            identical: bool, setup: str, note: str = ""):
    from PIL import Image, ImageDraw

    def tile(array):
        image = Image.fromarray(array)
        return image.resize((cell, cell), Image.NEAREST if image.width <= cell else Image.LANCZOS)

    geometry = FigureLayout(len(results), len(strengths), FigureLayout.cell_for(base.shape[1]), bool(note))
    cell, margin, width = geometry.cell, geometry.margin, geometry.width
    figure = Image.new("RGB", (width, geometry.height), "white")
    draw = ImageDraw.Draw(figure)
    f_title, f_head, f_text, f_small = _font(22), _font(16), _font(13), _font(11)

    labels = {r.label for r in results}
    what = "a LoHa and a LoKr" if labels == {"LoHa", "LoKr"} and len(results) == 2 else "each adapter"
    draw.text((margin, 12), f"lohakr demo: the same picture with {what} loaded at several strengths",
              fill=INK, font=f_title)
    draw.text((margin, 42), f"{setup}.", fill=GREY, font=f_text)
    draw.text((margin, 60), "Random tiny models draw noise, so read the heat maps: they show where and how much "
              "each strength changed the picture. The bars show how much it changed the weights, per block.",
              fill=GREY, font=f_text)
    if note:
        draw.text((margin, 78), note, fill=GREY, font=f_text)

    for i, result in enumerate(results):
        y = geometry.section_top(i)
        draw.line((margin, y + 4, width - margin, y + 4), fill=LIGHT, width=1)
        applied = len(result.report.applied)
        draw.text((margin, y + 10), f"{result.label}  ({result.name}: {applied}/{len(result.report.outcomes)} "
                  f"modules applied, loaded in {result.load_time:.2f} s)", fill=INK, font=f_head)
        for j, strength in enumerate(strengths):
            x, top = geometry.tile(i, j)[0], y + 30
            colour = _strength_colour(strengths, strength)
            draw.rectangle((x, top + 4, x + 11, top + 15), fill=colour or "white", outline=GREY)
            draw.text((x + 17, top + 2), f"strength {strength:g}", fill=INK, font=f_text)
        row1, row2 = geometry.tile(i, 0)[1], geometry.tile(i, 0, heat=True)[1]
        draw.text((margin, row1 + cell // 2 - 8), "output", fill=INK, font=f_text)
        if "random" in setup:
            draw.multiline_text((margin, row1 + cell // 2 + 10), "(noise: the model's\nweights are random)",
                                fill=GREY, font=f_small, spacing=2)
        draw.multiline_text((margin, row2 + cell // 2 - 26), "change vs.\nno adapter\n(heat map)",
                            fill=INK, font=f_text, spacing=3)
        for j, image in enumerate(result.images):
            figure.paste(tile(image), geometry.tile(i, j)[:2])
            x, y_heat = geometry.tile(i, j, heat=True)[:2]
            figure.paste(tile(_heat(image, base)), (x, y_heat))
            change = _mean_change(image, base)
            caption = "identical: 0" if change == 0 else f"mean change {change:.1f}"
            draw.text((x, y_heat + cell + 4), caption, fill=INK if change else (0, 120, 0), font=f_small)
        _bar_chart(draw, geometry.chart(i), result, strengths, blocks, f_text, f_small)

    y = geometry.section_top(len(results))
    # footer: heat legend, strength legend, the unload check
    y += 6
    draw.line((margin, y, width - margin, y), fill=LIGHT, width=1)
    bar = Image.fromarray(_heat_lut()[None, :, :].repeat(14, axis=0)).resize((256, 14))
    figure.paste(bar, (margin + 150, y + 14))
    draw.text((margin, y + 14), "heat map colours", fill=INK, font=f_text)
    for value in (0, HEAT_FULL // 2, HEAT_FULL):
        x = margin + 150 + round(value / HEAT_FULL * 255)
        draw.line((x, y + 28, x, y + 32), fill=INK)
        label = f"{value}" if value < HEAT_FULL else f">={value}"
        draw.text((x - draw.textlength(label, font=f_small) / 2, y + 33), label, fill=INK, font=f_small)
    draw.text((margin + 420, y + 14), "mean |change| of a pixel over R, G, B, in levels of 0-255; black = unchanged",
              fill=GREY, font=f_small)
    restored = all(r.restored == n_weights for r in results)
    check = (f"unload: {'all' if restored else 'NOT all'} {n_weights} weights restored bit for bit after each "
             f"adapter; output afterwards {'identical to' if identical else 'DIFFERENT from'} the output before "
             "loading")
    draw.text((margin, y + 56), ("OK  " if restored and identical else "FAILED  ") + check,
              fill=(0, 120, 0) if restored and identical else (190, 0, 0), font=f_text)
    return figure


def _bar_chart(draw, box: tuple[int, int, int, int], result: _Result, strengths: list[float], blocks: list[str],
               font, small) -> None:
    """Per-block relative weight change, one bar per block with the strengths nested (largest behind)."""
    left, top, right, bottom = box
    blocks = [b for b in blocks if any(b in c for c in result.changes)] or blocks
    draw.text((left, top + 2), "weight change per block:  |W - W0| / |W0|", fill=INK, font=font)
    plot_left, plot_top, plot_right, plot_bottom = left + 38, top + 26, right - 4, bottom - 34
    peak = max((v for c in result.changes for v in c.values()), default=0.0)
    step = next((s for s in (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0) if peak / s <= 5), 10.0)
    y_max = max(step, math.ceil(peak / step - 1e-9) * step)

    def y_of(value: float) -> float:
        return plot_bottom - (plot_bottom - plot_top) * min(value, y_max) / y_max

    tick = 0.0
    while tick <= y_max + 1e-9:
        y = y_of(tick)
        draw.line((plot_left, y, plot_right, y), fill=LIGHT if tick else GREY)
        label = f"{tick:.0%}"
        draw.text((plot_left - 5 - draw.textlength(label, font=small), y - 6), label, fill=GREY, font=small)
        tick += step
    slot = (plot_right - plot_left) / max(len(blocks), 1)
    order = sorted(range(len(strengths)), key=lambda j: -strengths[j])
    for i, block in enumerate(blocks):
        x = plot_left + i * slot
        for j in order:
            colour = _strength_colour(strengths, strengths[j])
            value = result.changes[j].get(block, 0.0)
            if colour is not None and value > 0:
                draw.rectangle((x + 2, y_of(value), x + slot - 2, plot_bottom), fill=colour)
        label = _block_label(block)
        draw.text((x + slot / 2 - draw.textlength(label, font=small) / 2, plot_bottom + 3), label, fill=INK,
                  font=small)
    # group names under the block numbers
    groups: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        group = ("text encoders" if block.startswith("TE") else "IN (down)" if block.startswith("IN")
                 else "OUT (up)" if block.startswith("OUT") else "mid" if block.startswith("M")
                 else "other" if block == "OTHER" else "")
        if group:
            groups.setdefault(group, []).append(i)
    for group, members in groups.items():
        x1, x2 = plot_left + members[0] * slot + 2, plot_left + (members[-1] + 1) * slot - 2
        draw.line((x1, plot_bottom + 19, x2, plot_bottom + 19), fill=GREY)
        label = group if draw.textlength(group, font=small) < x2 - x1 + 12 else group.split()[0]
        draw.text(((x1 + x2) / 2 - draw.textlength(label, font=small) / 2, plot_bottom + 21), label, fill=GREY,
                  font=small)
    # legend, top right
    legend = [s for s in sorted(set(strengths), reverse=True) if s != 0]
    x = plot_right
    for strength in legend:
        label = f"{strength:g}"
        x -= draw.textlength(label, font=small) + 20
        draw.rectangle((x, top + 5, x + 10, top + 15), fill=_strength_colour(strengths, strength))
        draw.text((x + 13, top + 4), label, fill=INK, font=small)
    draw.text((x - draw.textlength("strength", font=small) - 6, top + 4), "strength", fill=INK, font=small)
