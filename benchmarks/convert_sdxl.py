"""LoHa/LoKr → LoRA conversion of full-size SDXL files at a requested error: per file and error, the
LoRA's size, the ranks and the distribution of the per-module relative error, and the time.

    python benchmarks/convert_sdxl.py [--errors 1e-2,1e-3] [--adapters LIST] [--dtype fp16]

Files: the real LyCORIS files of patch_sdxl.py (cached in benchmarks/.cache). Each module becomes an
exact LoRA where its exact rank is within what the error needs, else a truncated SVD at the smallest
rank whose relative Frobenius error, after the cast to the stored dtype, is at most E
(docs/format.md#dora-in-a-lora: the rank rises until it is).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--errors", default="1e-2,1e-3")
    parser.add_argument("--adapters", default="loha_d32_tucker,lokr_f8")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    args = parser.parse_args(argv)

    from patch_sdxl import ADAPTERS, make_adapter_file

    import lohakr
    from lohakr.loaders.convert import convert_adapter
    from lohakr.loaders.reference_models import reference_layout

    layout = reference_layout("sdxl")
    for name in args.adapters.split(","):
        path = make_adapter_file(name, ADAPTERS[name])
        adapter = lohakr.load_adapter(path)
        print(f"\n{name}: {path.stat().st_size / 2**20:.0f} MiB, {len(adapter.modules)} modules")
        for error in (float(e) for e in args.errors.split(",")):
            started = time.perf_counter()
            conversion = convert_adapter(adapter, layout, rank=1 << 20, max_error=error, dtype=args.dtype)
            seconds = time.perf_counter() - started
            errors = sorted(m.error for m in conversion.modules)
            ranks = [m.rank for m in conversion.modules]
            methods = {m: sum(1 for line in conversion.modules if line.method == m) for m in ("exact", "svd")}
            median, p90 = (errors[min(len(errors) - 1, int(q * len(errors)))] for q in (0.5, 0.9))
            print(f"  E={error:g}: {conversion.nbytes() / 2**20:7.1f} MiB, {methods['exact']} exact + "
                  f"{methods['svd']} SVD modules, rank median {statistics.median(ranks):.0f} "
                  f"[{min(ranks)}..{max(ranks)}]; error max {errors[-1]:.2e}, mean {conversion.mean_error:.2e}, "
                  f"median {median:.2e}, p90 {p90:.2e}; {seconds:.1f} s")
            for note in conversion.notes:
                print(f"    note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
