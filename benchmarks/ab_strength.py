"""Interleaved A/B of two lohakr trees on full-size SDXL: loads and strength changes.

    python benchmarks/ab_strength.py OLD_TREE NEW_TREE [--rounds 4] [--changes 3] [--dtype fp16]
        [--adapters loha_d32_tucker,lokr_f8,lokr_full_w2] [--json FILE]

Each tree (a checkout of this repository, e.g. from ``git worktree add``) is imported under its
own package name in one process, and both patch the same full SDXL UNet + CLIP-L + CLIP-G, built
once (``patch_sdxl.build_models``), with the same real LyCORIS files (``patch_sdxl.make_adapter_file``).
Per round and adapter, each tree in turn (the order alternates between rounds) loads the adapter,
changes its strength ``--changes`` times and unloads it, which gives every original back bit for
bit: both trees always start from the same weights and the same process state, and a drifting
machine slows both alike. Reported: per tree the median and range of loads and of strength
changes, and new / old.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import patch_sdxl  # noqa: E402


def import_tree(tree: Path, name: str, into: Path) -> ModuleType:
    """The ``loaders`` package of ``tree``, imported as ``<name>.loaders`` (its imports are relative)."""
    package = into / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copytree(tree / "loaders", package / "loaders", ignore=shutil.ignore_patterns("__pycache__"))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return importlib.import_module(f"{name}.loaders")


def one_round(loaders: ModuleType, parts: dict, path: Path, changes: int) -> tuple[float, list[float]]:
    """Load, ``changes`` strength changes, unload; returns the load time and the changes' times."""
    pipe = loaders.enable(SimpleNamespace(**parts, _progress_bar_config={"disable": True}))
    adapter = loaders.load_adapter(path)
    started = time.perf_counter()
    pipe.load_lycoris(adapter, "ab")
    load = time.perf_counter() - started
    times = []
    for k in range(changes):
        started = time.perf_counter()
        pipe.set_lycoris_strength("ab", 0.5 if k % 2 == 0 else 1.0)
        times.append(time.perf_counter() - started)
    pipe.unload_lycoris()
    del pipe, adapter
    gc.collect()
    return load, times


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} s [{min(values):.3f}..{max(values):.3f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the first tree (a checkout of this repository)")
    parser.add_argument("new", type=Path, help="the second tree")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--changes", type=int, default=3, help="strength changes per load")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--adapters", default=",".join(patch_sdxl.ADAPTERS))
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    args = parser.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    names = [n for n in args.adapters.split(",") if n]
    paths = {name: patch_sdxl.make_adapter_file(name, patch_sdxl.ADAPTERS[name]) for name in names}
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"old": import_tree(args.old.resolve(), "lohakr_ab_old", Path(scratch)),
                 "new": import_tree(args.new.resolve(), "lohakr_ab_new", Path(scratch))}
        for label, loaders in trees.items():
            native = importlib.import_module(f"{loaders.__name__}.native")
            native.usable(torch.empty(1, dtype=dtype))  # build and check the kernels before timing
            print(f"{label}: {args.__dict__[label]}: {native.status()}")
        parts = patch_sdxl.build_models(dtype, "cpu")
        results: dict = {name: {label: {"load": [], "strength": []} for label in trees} for name in names}
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for name in names:
                for label in order:
                    load, changes = one_round(trees[label], parts, paths[name], args.changes)
                    results[name][label]["load"].append(load)
                    results[name][label]["strength"].extend(changes)
                    print(f"round {round_index + 1} {name:16s} {label}: load {load:.3f} s, strength "
                          + ", ".join(f"{t:.3f}" for t in changes), flush=True)
    print(f"\n{args.dtype}, {args.rounds} rounds, {args.changes} strength changes per load, "
          f"{torch.get_num_threads()} threads")
    for name in names:
        old, new = results[name]["old"], results[name]["new"]
        for step in ("load", "strength"):
            ratio = statistics.median(new[step]) / statistics.median(old[step])
            print(f"  {name:16s} {step:8s} old {summary(old[step])}  new {summary(new[step])}  new/old {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
