"""The README's main job runs with no arguments and no downloads, and writes a figure that shows the effect:
per adapter and strength the output beside a heat map of its change, and a per-block weight-change chart."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import torch
from PIL import Image

from lohakr import load_adapter
from lohakr.loaders.demo import (
    STRENGTH_COLOURS,
    FigureLayout,
    _block_change,
    _figure,
    _heat_lut,
    _Result,
    _snapshot,
    factorization,
    loha_profile,
    lokr_profile,
    make_demo_adapter,
)


def _crop(image: Image.Image, box) -> np.ndarray:
    return np.asarray(image.crop(box).convert("RGB")).astype(np.int16)


def _has_colour(pixels: np.ndarray, colour) -> bool:
    return bool((pixels == np.array(colour, dtype=np.int16)).all(axis=-1).any())


def test_demo_writes_figure_that_shows_the_effect(tmp_path):
    out = tmp_path / "demo.png"
    result = subprocess.run(
        [sys.executable, "-m", "lohakr", "demo", "--out", str(out), "--steps", "2", "--strengths", "0,1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = result.stdout
    assert "demo_loha: 288/288 modules applied" in stdout
    assert "demo_lokr: 288/288 modules applied" in stdout
    assert stdout.count("unloaded: 288/288 weights restored bit for bit") == 2
    assert "output after unloading everything: identical to the output before loading" in stdout
    change = [line.split(":", 1)[1] for line in stdout.splitlines() if "mean |pixel change|" in line]
    assert len(change) == 2
    for line in change:
        at = dict(part.split(": ") for part in line.strip().split(", "))
        assert float(at["0"]) == 0 and float(at["1"]) > 0.5, line

    image = Image.open(out).convert("RGB")
    layout = FigureLayout(n_adapters=2, n_strengths=2, cell=128, note=True)
    assert image.size == (layout.width, layout.height)
    black = _heat_lut()[0]
    for i in range(2):
        # strength 0: the heat map is black everywhere, the output equals the other adapter's at 0
        zero = _crop(image, layout.tile(i, 0, heat=True))
        assert (zero == black).all()
        assert (_crop(image, layout.tile(i, 0)) == _crop(image, layout.tile(1 - i, 0))).all()
        # strength 1: the output differs, and the heat map lights up over much of the picture
        assert (_crop(image, layout.tile(i, 1)) != _crop(image, layout.tile(i, 0))).any()
        heat = _crop(image, layout.tile(i, 1, heat=True))
        assert (heat != black).any(axis=-1).mean() > 0.5
        assert heat.mean() > zero.mean() + 10
        # the chart draws strength 1's bars in its colour (strength 0 has none)
        assert _has_colour(_crop(image, layout.chart(i)), STRENGTH_COLOURS[0])


def test_figure_heat_maps_grow_with_strength():
    """Without a pipeline: fake outputs that drift from the base by 0, 10 and 20 levels."""
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, size=(64, 64, 3), dtype=np.uint8)
    strengths = [0.0, 0.5, 1.0]
    report = types.SimpleNamespace(applied=[object()] * 3, outcomes=[object()] * 3)
    result = _Result("fake", "LoHa", report, 0.01)
    result.images = [np.clip(base.astype(int) + int(20 * s), 0, 255).astype(np.uint8) for s in strengths]
    result.changes = [{"IN00": 0.1 * s, "OUT00": 0.4 * s} for s in strengths]
    figure = _figure([result], strengths, base, ["IN00", "OUT00"], 3, True, "fake setup")
    layout = FigureLayout(n_adapters=1, n_strengths=3, cell=128, note=False)
    assert figure.size == (layout.width, layout.height)
    brightness = [_crop(figure, layout.tile(0, j, heat=True)).mean() for j in range(3)]
    assert brightness[0] == _heat_lut()[0].mean() and brightness[0] < brightness[1] < brightness[2]
    chart = _crop(figure, layout.chart(0))
    assert _has_colour(chart, STRENGTH_COLOURS[0]) and _has_colour(chart, STRENGTH_COLOURS[1])


def test_factorization_matches_spec_table():
    table = {(4, -1): (2, 2), (320, -1): (16, 20), (640, -1): (20, 32), (1280, -1): (32, 40), (768, -1): (24, 32),
             (2048, -1): (32, 64), (5120, -1): (64, 80), (10240, -1): (80, 128), (360, -1): (18, 20),
             (127, -1): (1, 127), (512, 4): (4, 128), (512, 64): (8, 64), (360, 16): (15, 24), (320, 32): (10, 32),
             (4, 4): (1, 4), (250, 4): (2, 125)}
    for (dim, factor), expected in table.items():
        assert factorization(dim, factor) == expected, (dim, factor)


def test_demo_adapters_resolve_fully(tmp_path):
    from lohakr.loaders import tiny_models
    from lohakr.loaders.diffusers_pipeline import pipeline_layout

    pipe = tiny_models.make_sdxl_pipeline(tmp_path / "tok")
    layout = pipeline_layout(pipe)
    for kind in ("loha", "lokr"):
        adapter = load_adapter(make_demo_adapter(layout, kind))
        assert adapter.kinds == {kind} and adapter.base_model == "sdxl"
        assert any(m.tucker for m in adapter.modules.values()) == (kind == "loha")
        for name, module in adapter.modules.items():
            assert module.check_target(layout.resolve(name).weight_shape) is None
            assert torch.isfinite(module.delta(layout.resolve(name).weight_shape)).all()


def test_chart_reads_the_adapter_profile_back_off_the_weights(tmp_path):
    """What the bars show is the live weights' change: the per-block profile the adapter was made with,
    times the strength; unloading gives every weight back bit for bit."""
    from lohakr.loaders import tiny_models
    from lohakr.loaders.diffusers_pipeline import enable, pipeline_layout

    pipe = enable(tiny_models.make_sdxl_pipeline(tmp_path / "tok"))
    layout = pipeline_layout(pipe)
    originals = _snapshot(layout)
    for kind, profile in (("loha", loha_profile), ("lokr", lokr_profile)):
        getattr(pipe, f"load_{kind}")(make_demo_adapter(layout, kind, magnitude=profile), kind, strength=1.0)
        for strength in (1.0, 0.5):
            pipe.set_lycoris_strength(kind, strength)
            change = _block_change(layout, originals)
            assert set(change) == set(layout.blocks)
            for block, value in change.items():
                assert abs(value - strength * profile(block)) < 1e-3, (kind, block, value)
        pipe.unload_lycoris(kind)
        assert all(v == 0 for v in _block_change(layout, originals).values())
    assert loha_profile("IN00") < loha_profile("M00") < loha_profile("OUT08")
    assert lokr_profile("IN00") > lokr_profile("M00") > lokr_profile("OUT08")
