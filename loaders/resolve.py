"""Match an adapter's modules to a model's layers and classify every module (docs/names-and-blocks.md#outcomes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .adapter import Adapter
from .errors import AdapterShapeError, BaseModelMismatchError, StrictLoadError
from .metadata import BASE_MODEL_NAMES
from .names import LayerPart, LayerTarget, ModelLayout, guess_block
from .report import LoadReport, ModuleOutcome
from .updates import LayerUpdate, PlacedUpdate, ReorderedUpdate


@dataclass(eq=False)
class Match:
    """A module of the file and the layer it patches."""

    module: LayerUpdate
    target: LayerTarget

    @property
    def block(self) -> str:
        return self.target.block


def resolve(
    adapter: Adapter,
    layout: ModelLayout,
    *,
    strict: bool = False,
    check_base_model: bool = True,
    fallback: Callable[[str], LayerTarget | None] | None = None,
    fallback_name: str = "host",
) -> tuple[list[Match], LoadReport]:
    """Classify each module as applied / unmatched / mismatched / unsupported / duplicate (a second
    module for a layer that another module of the file already patches: the first one applies).

    Raises ``BaseModelMismatchError`` when the file is for another base model: its header, key
    names or shapes say so, or most modules do not fit (``check_base_model=False`` only reports);
    and ``StrictLoadError`` under ``strict=True`` when anything would not apply; both before any
    weight is touched. ``fallback`` resolves names the layout does not know (a host's own
    key map); such outcomes carry ``resolver=fallback_name``.
    """
    report = LoadReport(
        adapter=adapter.name,
        source=adapter.source,
        base_model=adapter.base_model,
        model_family=layout.family,
        blocks=list(layout.blocks),
        warnings=list(adapter.warnings),
    )
    matches: list[Match] = []
    patched_by: dict[str, str] = {}  # layer → the module that patches it
    for name, module in adapter.modules.items():
        outcome, module_matches = _classify(name, module, layout, fallback, fallback_name, patched_by,
                                            adapter.header_only)
        report.outcomes.append(outcome)
        matches.extend(module_matches)
    for name, reason in adapter.skipped.items():
        report.outcomes.append(ModuleOutcome(name, "unsupported", guess_block(name), None, reason=reason))

    if check_base_model:
        _refuse_other_base_model(adapter, layout, report)
    if strict and report.not_applied:
        raise StrictLoadError(
            f"{adapter.source}: strict load refused, {len(report.not_applied)} of "
            f"{len(report.outcomes)} modules would not apply; nothing was patched.\n"
            + "\n".join(f"  {o.module} [{o.status}] {o.reason}" for o in report.not_applied[:20])
        )
    return matches, report


def _classify(name: str, module: LayerUpdate, layout: ModelLayout,
              fallback: Callable[[str], LayerTarget | None] | None, fallback_name: str,
              patched_by: dict[str, str], shapes_only: bool = False) -> tuple[ModuleOutcome, list[Match]]:
    """One module's outcome, and its matches when it applies (``patched_by``: layers taken so far).
    A module for a fused layer the model splits has one match per part
    (docs/names-and-blocks.md#fused-and-split-layers)."""
    parts = layout.resolve_parts(name)
    resolver = "lohakr"
    if parts is None and fallback is not None:
        target = fallback(name)
        parts = None if target is None else [LayerPart(target)]
        resolver = fallback_name
    if parts is None:
        return ModuleOutcome(name, "unmatched", guess_block(name), module.kind,
                             reason="no layer of this model has this name"), []
    first_target = parts[0].target
    where = " + ".join(_part_key(part) for part in parts)
    shape = (sum(part.height for part in parts), *first_target.weight_shape[1:])
    problem = module.check_target(shape)
    if problem is None and any(part.target.weight_shape[1:] != first_target.weight_shape[1:] for part in parts):
        problem = f"its parts {where} differ in input width"
    if problem:
        return ModuleOutcome(name, "mismatched", first_target.block, module.kind, where, problem, resolver), []
    for part in parts:
        first = patched_by.setdefault(_part_key(part, host=True), name)
        if first != name:
            reason = (f"the file also names this layer as {first}, which is applied; a layer is patched once "
                      "(the file names it in two styles)")
            return ModuleOutcome(name, "duplicate", first_target.block, module.kind, where, reason, resolver), []
    try:
        matches = _part_matches(module, parts, shapes_only)
    except AdapterShapeError as err:
        return ModuleOutcome(name, "unsupported", first_target.block, module.kind, where, str(err), resolver), []
    return ModuleOutcome(name, "applied", first_target.block, module.kind, where, resolver=resolver), matches


def _part_key(part: LayerPart, host: bool = False) -> str:
    key = (part.target.host_key or part.target.key) if host else part.target.key
    return key if part.rows is None else f"{key}[{part.rows[0]}:{part.rows[1]}]"


def _part_matches(module: LayerUpdate, parts: list[LayerPart], shapes_only: bool = False) -> list[Match]:
    """The module's rows, part by part, as updates of each part's layer (sliced factors, no product).
    ``shapes_only`` (a file read for its header): only whether it can be split; no matches."""
    if len(parts) == 1 and parts[0].rows is None:
        return [Match(module, parts[0].target)]
    layer = parts[0].target
    if all(part.target is layer and part.rows for part in parts) and sum(p.height for p in parts) == \
            layer.weight_shape[0]:  # one layer, its rows in another order: no split, any DoRA
        moves, row = [], 0
        for part in parts:
            moves.append((row, part.rows[0], part.height))
            row += part.height
        return [] if shapes_only else [Match(ReorderedUpdate.of(module, moves), layer)]
    if shapes_only:
        problem = module.why_not_splittable()
        if problem:
            raise AdapterShapeError(problem)
        return []
    matches, row = [], 0
    for part in parts:
        target, start = part.target, (part.rows[0] if part.rows else 0)
        for offset, piece in module.row_pieces(row, row + part.height):
            whole = part.rows is None and offset == 0 and piece.out_features == part.height
            update = piece if whole else PlacedUpdate.of(piece, start + offset, target.weight_shape)
            matches.append(Match(update, target))
        row += part.height
    return matches


def _refuse_other_base_model(adapter: Adapter, layout: ModelLayout, report: LoadReport) -> None:
    """Refuse an adapter for another base model: when the file says so (header, key names or
    cross-attention widths; ``Adapter.base_model``), or when most of its modules do not fit."""
    counts = report.counts()
    considered = counts["applied"] + counts["unmatched"] + counts["mismatched"]
    known = adapter.base_model != "unknown" and layout.family != "unknown"
    if known and adapter.base_model != layout.family:
        raise BaseModelMismatchError(
            f"{adapter.source}: this is {article(BASE_MODEL_NAMES[adapter.base_model])} adapter "
            f"({adapter.base_model_evidence}); the model is {BASE_MODEL_NAMES[layout.family]}. "
            f"{counts['applied']} of {considered} modules would fit, but an adapter applied to another base "
            "model gives wrong results. Use a matching base model, or pass allow_base_mismatch=True (node "
            "option 'allow_base_mismatch') to apply what fits anyway; nothing was patched"
        )
    if considered == 0 or counts["applied"] * 2 > considered:
        return
    if counts["applied"] == 0 and counts["mismatched"]:
        example = report.of("mismatched")[0]
        raise BaseModelMismatchError(
            f"{adapter.source}: none of the {considered} modules fits this "
            f"{BASE_MODEL_NAMES[layout.family]} model (e.g. {example.module}: {example.reason}). "
            "The adapter was probably trained for another base model; nothing was patched"
        )


def article(name: str) -> str:
    return ("an " if name[:1] in "AEFHILMNORSX" else "a ") + name

