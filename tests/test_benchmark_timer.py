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
    steps = [(label, lambda label=label: calls.append(label)) for label in ("load", "strength", "unload")]
    result = timer.cycle(steps, reps=3, tag="x:")
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


def test_one_part_needs_its_own_memory_and_the_message_names_the_parts(bench, monkeypatch, capsys):
    """--parts unet / text_encoders: each part's memory is its own; together they are the whole."""
    whole, _ = bench.memory_needed(torch.float32)
    unet, needed = bench.memory_needed(torch.float32, bench.PARTS["unet"])
    text, _ = bench.memory_needed(torch.float32, bench.PARTS["text_encoders"])
    assert unet + text == whole and 9 * 2**30 < unet < 10 * 2**30
    assert needed == 2 * unet + 2**30
    monkeypatch.setattr(bench, "memory_available", lambda: needed - 1)
    monkeypatch.setattr(bench, "machine_peaks", lambda device: pytest.fail("measured a machine it cannot use"))
    assert bench.main(["--dtype", "fp32", "--device", "cpu", "--no-lycoris"]) == 2
    assert "--parts unet or --parts text_encoders" in capsys.readouterr().err
    assert bench.main(["--dtype", "fp32", "--device", "cpu", "--no-lycoris", "--parts", "unet"]) == 2
    err = capsys.readouterr().err
    assert "full-size fp32 run of unet" in err and "--parts" not in err.split("Use ")[1]


def test_a_part_file_keeps_exactly_that_parts_modules(bench, monkeypatch, tmp_path):
    """The adapter file for one part is the full lycoris-lora file's tensors of that part, unchanged,
    with its metadata (the loader reads the base model from it)."""
    from safetensors import safe_open

    monkeypatch.setattr(bench, "CACHE", tmp_path)
    config = bench.ADAPTERS["lokr_full_w2"]
    unet = bench.make_adapter_file("lokr_full_w2", config, bench.PARTS["unet"])
    text = bench.make_adapter_file("lokr_full_w2", config, bench.PARTS["text_encoders"])
    full = bench.cached_adapter_file("lokr_full_w2", config)
    assert len({unet, text, full}) == 3 and full.exists()
    with safe_open(str(full), "pt") as f, safe_open(str(unet), "pt") as u, safe_open(str(text), "pt") as t:
        assert set(u.keys()) | set(t.keys()) == set(f.keys()) and not set(u.keys()) & set(t.keys())
        assert all(k.startswith("lora_unet_") for k in u.keys())
        assert {k.split("_")[1] for k in t.keys()} == {"te1", "te2"}
        for part in (u, t):
            assert part.metadata() == f.metadata()
            for key in list(part.keys())[::97]:
                assert torch.equal(part.get_tensor(key), f.get_tensor(key))
    import lohakr

    assert {name.split("_")[1] for name in lohakr.load_adapter(unet).modules} == {"unet"}


def _saved_run(faults_per_load: int) -> dict:
    """A run as --json saves it, with round figures: one adapter, three cycles."""
    runs = {"load": [2.0, 2.0, 2.0], "strength": [1.0, 1.0, 1.0], "copy": [0.5, 0.5, 0.5],
            "fused": [0.8, 0.8, 0.8], "fused_restore": [0.5, 0.5, 0.5]}
    ours = {"parse_s": 0.5, "load_patch_s": 2.0, "strength_s": 1.0, "unload_s": 0.1, "runs": runs,
            "kernel": {"load": [[0.4, faults_per_load]] * 3, "strength": [[0.0, 0]] * 3},
            "cycle_gemm_flops": [100e9] * 3, "same_bytes_copy_s": 0.5, "peak_extra_bytes": 2**30,
            "kept_originals_bytes": 2**30, "fused_load_s": 0.8, "fused_peak_extra_bytes": 0,
            "fused_cycle_gemm_flops": [100e9] * 3}
    entry = {"modules": 10, "file_mb": 1.0, "flops": 10e9, "bytes_min": 20e9, "lower_bound_s": 1.0,
             "roofline_now": {"gemm_flops": 100e9, "bandwidth": 20e9, "first_touch_bandwidth": 4e9},
             "largest_layer_delta_bytes": 2**20, "lohakr": ours,
             "lycoris": {"load_patch_s": 10.0, "peak_extra_bytes": 0}}
    return {"adapters": {"lokr_f8": entry}, "comfyui": {"skipped": "COMFYUI_DIR not set"}}


def test_a_loads_own_bound_adds_what_its_page_faults_cost_beyond_a_write(bench, capsys):
    """Faulting a page in costs 1/fresh - 1/copy per byte beyond writing it, on the same cores as the
    work: a load's own bound is the roofline plus that for the pages it faulted in (at most its new
    storage), and the LyCORIS ratio it would have had at that bound is reported beside the real one."""
    import mmap

    report = _saved_run(faults_per_load=10**6)
    bench.summarize(report)
    entry = report["adapters"]["lokr_f8"]
    extra = 10**6 * mmap.PAGESIZE * (1 / 4e9 - 1 / 20e9)
    assert entry["lohakr"]["load_bounds_s"] == pytest.approx([1.0 + extra] * 3)
    assert entry["reversible_lower_bound_s"] == pytest.approx(1.0 + 10e9 * (1 / 4e9 - 1 / 20e9))
    assert entry["lycoris"]["ratio_at_own_bound"] == pytest.approx(10.0 / (0.5 + 1.0 + extra))
    # the in-cycle bound: max(GEMM 0.1 s, copy 0.5 s) + the faults' extra cost; strength has none
    assert entry["lohakr"]["in_cycle_bound_ratios"]["load"] == pytest.approx([2.0 / (0.5 + extra)] * 3)
    assert entry["lohakr"]["in_cycle_bound_ratios"]["strength"] == pytest.approx([2.0] * 3)
    out = capsys.readouterr().out
    assert "4.0× lohakr parse + load" in out and f"{10.0 / (1.5 + extra):.1f}× for a load at its own bound" in out
    # more faults than the new storage has pages count as the new storage (the rest is not the load's)
    many = _saved_run(faults_per_load=10**9)
    bench.summarize(many)
    assert many["adapters"]["lokr_f8"]["lohakr"]["load_bounds_s"][0] == pytest.approx(
        many["adapters"]["lokr_f8"]["reversible_lower_bound_s"])


def test_report_reprints_a_saved_run_without_measuring(bench, monkeypatch, tmp_path, capsys):
    import json

    path = tmp_path / "run.json"
    path.write_text(json.dumps(_saved_run(faults_per_load=0)))
    monkeypatch.setattr(bench, "machine_peaks", lambda device: pytest.fail("measured a machine"))
    monkeypatch.setattr(bench, "build_models", lambda *a, **k: pytest.fail("built a model"))
    assert bench.main(["--report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lokr_f8: 10 modules" in out and "(2.00× bound" in out and "6.7× for a load at its own bound" in out
