"""The README's main job runs with no arguments and no downloads, and writes its grid."""

from __future__ import annotations

import subprocess
import sys

import torch
from PIL import Image

from lohakr import load_adapter
from lohakr.loaders.demo import factorization, make_demo_adapter


def test_demo_writes_grid_and_reports(tmp_path):
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [sys.executable, "-m", "lohakr", "demo", "--out", str(out), "--steps", "2", "--strengths", "0,1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "demo_loha: 288/288 modules applied" in result.stdout
    assert "demo_lokr: 288/288 modules applied" in result.stdout
    image = Image.open(out)
    assert image.size == (150 + 2 * 128, 20 + 2 * 128)
    change = [line for line in result.stdout.splitlines() if "mean |pixel change|" in line]
    assert len(change) == 2 and all(float(line.rsplit(":", 1)[1]) > 0.5 for line in change)


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
