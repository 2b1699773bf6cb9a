"""What a file is, as data and as text: used by ``python -m lohakr info``, the ComfyUI info node
and the web card."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .adapter import KIND_NAMES, Adapter
from .errors import LohakrError
from .metadata import BASE_MODEL_NAMES
from .names import ModelLayout
from .resolve import article, resolve
from .updates import LokrUpdate

TRAINING_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_output_name",
                 "ss_sd_model_name", "ss_num_train_images", "ss_num_epochs", "ss_learning_rate",
                 "ss_training_started_at")


def _distribution(values: list) -> dict[str, int]:
    counts = Counter(values)
    return {("none" if k is None else f"{k:g}" if isinstance(k, float) else str(k)): n
            for k, n in sorted(counts.items(), key=lambda kv: _order(kv[0]))}


def _order(value: Any) -> tuple:
    if value is None:
        return (2, 0.0, "")
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def describe_adapter(adapter: Adapter, *, top_tags: int = 10) -> dict[str, Any]:
    """A JSON-able summary: algorithms, ranks, alphas, scales, factors, flags, base model, tags."""
    modules = list(adapter.modules.values())
    lokr = [m for m in modules if isinstance(m, LokrUpdate)]
    info = adapter.metadata
    dora_axes = Counter(
        ("output" if m.dora_scale.shape[0] != 1 or m.dora_scale.dim() == 1 else "input")
        for m in modules if m.dora_scale is not None
    )
    return {
        "name": adapter.name,
        "source": adapter.source,
        "modules": len(modules),
        "algorithms": {KIND_NAMES[k]: n for k, n in sorted(adapter.algorithm_counts.items())},
        "ranks": _distribution([m.rank for m in modules]),
        "alphas": _distribution([m.alpha for m in modules]),
        "scales": _distribution([round(m.scale, 6) for m in modules]),
        "scale_source": adapter.scale_source,
        "lokr_factors": _distribution([m.factor for m in lokr]),
        "lokr_full_w2": sum(1 for m in lokr if not m.w2_low_rank),
        "tucker": sum(1 for m in modules if m.tucker),
        "dora": sum(1 for m in modules if m.dora),
        "dora_axes": dict(dora_axes),
        "base_model": adapter.base_model,
        "base_model_name": adapter.base_model_name,
        "base_model_evidence": adapter.base_model_evidence,
        "resolution": info.resolution,
        "training": {k: info.raw[k] for k in TRAINING_KEYS if k in info.raw},
        "training_args": info.training_args,
        "modelspec": info.modelspec,
        "top_tags": info.top_tags(top_tags),
        "skipped": dict(adapter.skipped),
        "warnings": list(adapter.warnings),
        "size_mb": round(adapter.nbytes() / 2**20, 2),
    }


def describe_coverage(adapter: Adapter, layout: ModelLayout) -> dict[str, Any]:
    """How the file maps onto a layout, block by block (no weight touched)."""
    try:
        _, report = resolve(adapter, layout, check_base_model=False)
    except LohakrError as err:  # pragma: no cover - resolve only raises with strict/base checks
        return {"error": str(err)}
    data = report.to_dict()
    if adapter.base_model not in ("unknown", layout.family) and layout.family != "unknown":
        data["warnings"].insert(
            0, f"this is {article(adapter.base_model_name)} adapter; the layout is {BASE_MODEL_NAMES[layout.family]}"
        )
    return data


def format_description(d: dict[str, Any]) -> str:
    """Readable text for a ``describe_adapter`` dict: warnings and what is not applicable first."""
    lines = [f"{d['name']}  ({d['source']}, {d['size_mb']} MB)"]
    for warning in d["warnings"]:
        lines.append(f"  warning     {warning}")
    for name, reason in d["skipped"].items():
        lines.append(f"  skipped     {name}: {reason}")
    algos = ", ".join(f"{n} {k}" for k, n in d["algorithms"].items()) or "none"
    lines.append(f"  modules     {d['modules']}: {algos}")
    lines.append(f"  base model  {d['base_model_name']} ({d['base_model_evidence']})")
    lines.append(f"  ranks       {_fmt_dist(d['ranks'])}")
    lines.append(f"  alphas      {_fmt_dist(d['alphas'])}")
    lines.append(f"  scales      {_fmt_dist(d['scales'])}")
    if d.get("scale_source"):
        lines.append(f"              {d['scale_source']}")
    if d["lokr_factors"]:
        lines.append(f"  LoKr factor {_fmt_dist(d['lokr_factors'])}; full w2 in {d['lokr_full_w2']} modules")
    lines.append(f"  tucker      {d['tucker']} modules; DoRA {d['dora']} modules"
                 + (f" ({_fmt_dist(d['dora_axes'])} axis)" if d["dora_axes"] else ""))
    if d["resolution"]:
        lines.append(f"  resolution  {d['resolution']}")
    for key, value in d["training"].items():
        lines.append(f"  {key:<11} {value}")
    if d["training_args"]:
        args = ", ".join(f"{k}={v}" for k, v in d["training_args"].items() if v is not None)
        lines.append(f"  args        {args}")
    if d["top_tags"]:
        lines.append("  top tags    " + ", ".join(f"{t} ({n})" for t, n in d["top_tags"]))
    return "\n".join(lines)


def format_coverage(c: dict[str, Any], with_warnings: bool = True) -> str:
    """Readable text for a ``describe_coverage`` dict: counts per block, what each column means,
    the modules not applied."""
    if "error" in c:
        return f"  error: {c['error']}"
    counts = c["counts"]
    total = sum(counts.values())
    lines = [f"coverage on {c['model_family']}: {counts.get('applied', 0)}/{total} modules apply"]
    if with_warnings:
        lines += [f"  warning: {warning}" for warning in c.get("warnings", [])[:5]]
    columns = f"{'applied':>10}{'unmatched':>11}{'mismatched':>12}{'unsupported':>13}{'duplicate':>11}"
    lines.append(f"  {'block':<7}{columns}")
    for block, row in c["by_block"].items():
        if not any(row.values()):
            continue
        lines.append(f"  {block:<7}{row['applied']:>10}{row['unmatched']:>11}{row['mismatched']:>12}"
                     f"{row['unsupported']:>13}{row.get('duplicate', 0):>11}")
    lines.append("  applied: patches a layer of this model; unmatched: names no layer; mismatched: the layer's "
                 "shape differs;\n  unsupported: an algorithm lohakr does not apply; duplicate: a layer the file "
                 "names twice (applied once).")
    if "?" in c["by_block"]:
        lines.append("  block ?: modules whose names belong to no block of this model (see unmatched).")
    missing = [o for o in c["outcomes"] if o["status"] != "applied"]
    for o in missing[:15]:
        lines.append(f"  {o['module']} [{o['status']}] {o['reason']}")
    if len(missing) > 15:
        lines.append(f"  … and {len(missing) - 15} more")
    return "\n".join(lines)


def _fmt_dist(dist: dict[str, int]) -> str:
    return ", ".join(f"{k}×{n}" for k, n in dist.items()) or "-"
