"""The load report: what happened to every module of a file, per block."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

# ``duplicate``: a second module of the file for a layer another module already patches.
STATUSES = ("applied", "unmatched", "mismatched", "unsupported", "duplicate")


@dataclass
class ModuleOutcome:
    """One module of the file and where it ended up."""

    module: str
    status: str
    block: str
    kind: str | None = None
    target: str | None = None
    reason: str = ""
    resolver: str = "lohakr"


@dataclass
class LoadReport:
    """Every module of one file in exactly one of applied / unmatched / mismatched / unsupported /
    duplicate."""

    adapter: str
    source: str
    base_model: str
    model_family: str
    outcomes: list[ModuleOutcome] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    strength: dict[str, float] = field(default_factory=dict)
    block_weights: str = ""
    # Where the originals of the patched weights are after this load, per place (file / ram / gpu):
    # {"layers", "bytes", "files"}; empty where the host keeps them itself (ComfyUI) or with fuse=True.
    originals: dict[str, dict] = field(default_factory=dict)

    def of(self, status: str) -> list[ModuleOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def applied(self) -> list[ModuleOutcome]:
        return self.of("applied")

    @property
    def not_applied(self) -> list[ModuleOutcome]:
        return [o for o in self.outcomes if o.status != "applied"]

    @property
    def complete(self) -> bool:
        """True when every module of the file was applied."""
        return not self.not_applied

    def counts(self) -> Counter:
        return Counter(o.status for o in self.outcomes)

    def by_block(self) -> dict[str, dict[str, int]]:
        """block → {status: count}, blocks in model order, then any the model lacks."""
        table: dict[str, dict[str, int]] = {b: {s: 0 for s in STATUSES} for b in self.blocks}
        for o in self.outcomes:
            table.setdefault(o.block, {s: 0 for s in STATUSES})[o.status] += 1
        return table

    def summary(self) -> str:
        counts = self.counts()
        total = len(self.outcomes)
        parts = [f"{counts['applied']}/{total} modules applied"]
        for status in STATUSES[1:]:
            if counts[status]:
                parts.append(f"{counts[status]} {status}")
        return f"{self.adapter}: " + ", ".join(parts)

    def format(self, *, names: int = 20) -> str:
        """A readable multi-line table: per-block counts, then the modules not applied and why."""
        lines = [self.summary()]
        lines.append(f"  base model {self.base_model}, model {self.model_family}")
        header = f"  {'block':<7}" + "".join(f"{s:>12}" for s in STATUSES)
        lines.append(header)
        for block, row in self.by_block().items():
            if not any(row.values()):
                continue
            lines.append(f"  {block:<7}" + "".join(f"{row[s]:>12}" for s in STATUSES))
        missing = self.not_applied
        if missing:
            lines.append("  not applied:")
            for o in missing[:names]:
                lines.append(f"    {o.module} [{o.status}] {o.reason}")
            if len(missing) > names:
                lines.append(f"    … and {len(missing) - names} more")
        if self.originals:
            lines.append("  originals: " + originals_line(self.originals))
        for warning in self.warnings:
            lines.append(f"  warning: {warning}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counts"] = dict(self.counts())
        data["by_block"] = self.by_block()
        return data


def originals_line(places: dict[str, dict]) -> str:
    """``1058 layers in 3 files (6.2 GiB read back on unload), 2 in RAM (12.0 MiB)``."""
    parts = []
    for place in ("mapped", "file", "ram", "gpu"):
        entry = places.get(place)
        if not entry:
            continue
        if place == "mapped":
            count = len(entry.get("files", []))
            parts.append(f"{entry['layers']} layers in {count} memory-mapped source file{'s' if count != 1 else ''} "
                         f"(page cache, {_size(entry['bytes'])}, none copied)")
        elif place == "file":
            count = len(entry.get("files", []))
            parts.append(f"{entry['layers']} layers in {count} source file{'s' if count != 1 else ''} "
                         f"({_size(entry['bytes'])} read back on unload, none held in memory)")
        else:
            parts.append(f"{entry['layers']} layers in {place.upper()} ({_size(entry['bytes'])} held)")
    return ", ".join(parts) or "none kept"


def _size(n: int) -> str:
    for unit, step in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"
