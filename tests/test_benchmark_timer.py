"""The benchmark's measuring helpers (no timing asserted: speed is reported by the benchmark run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "patch_sdxl.py"
    spec = importlib.util.spec_from_file_location("patch_sdxl_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cycle_interleaves_steps_and_keeps_every_run(bench):
    calls = []
    timer = bench.Timer("cpu", warmup=1)
    result = timer.cycle([(label, lambda label=label: calls.append(label)) for label in ("load", "strength", "unload")],
                         reps=3, tag="x:")
    assert calls == ["load", "strength", "unload"] * 4  # one warm-up cycle, then three timed ones
    assert set(result) == {"load", "strength", "unload"}
    for label in result:
        times = timer.runs[f"x:{label}"]
        assert len(times) == 3 and result[label][0] == sorted(times)[1]
        kernel = timer.kernel[f"x:{label}"]
        assert len(kernel) == 3 and all(seconds >= 0 and faults >= 0 for seconds, faults in kernel)


def test_cycle_counts_the_page_faults_of_fresh_memory(bench):
    import torch

    keep = []
    timer = bench.Timer("cpu", warmup=0)
    # 64 MiB is above glibc's largest mmap threshold, so it is always memory never touched before:
    # 16384 faults of 4 KiB pages, or 32 of 2 MiB ones where transparent huge pages are always on.
    timer.cycle([("touch", lambda: keep.append(torch.ones(64 << 20, dtype=torch.uint8)))], reps=1)
    (_, faults), = timer.kernel["touch"]
    assert faults >= 16


def test_a_run_that_cannot_fit_in_memory_stops_first_and_says_why(bench, monkeypatch, capsys):
    """fp32 at full size needs the models twice (kept originals beside patched copies): on a
    machine without that much memory the script says so before building anything."""
    model, needed = bench.memory_needed(torch.float32)
    assert 12 * 2**30 < model < 14 * 2**30  # 3.4 B parameters
    assert needed == 2 * model + 2**30
    monkeypatch.setattr(bench, "memory_available", lambda: needed - 1)
    monkeypatch.setattr(bench, "machine_peaks", lambda device: pytest.fail("measured a machine it cannot use"))
    assert bench.main(["--dtype", "fp32", "--device", "cpu", "--no-lycoris"]) == 2
    assert "not enough memory for a full-size fp32 run" in capsys.readouterr().err
