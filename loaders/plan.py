"""The plan step both hosts share: adapter × layout × block weights × strengths → matches and a
report, with every refusal raised before any weight is touched.

diffusers (``diffusers_pipeline``) and ComfyUI (``nodes/comfy_bridge``) differ only in how they
then write the weights; what applies, what is refused and what the user is told is decided here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .adapter import Adapter
from .blocks import BlockWeights, parse_block_weights, zeroed_by_omission
from .errors import LohakrError, NothingToApplyError
from .metadata import BASE_MODEL_NAMES
from .names import LayerTarget, ModelLayout
from .report import LoadReport
from .resolve import Match, resolve

logger = logging.getLogger("lohakr")


@dataclass(eq=False)
class LoadPlan:
    """One adapter ready to apply: the modules that patch a layer, the block weights, the report."""

    adapter: Adapter
    matches: list[Match]
    report: LoadReport
    block_weights: BlockWeights


def plan_load(
    adapter: Adapter,
    layout: ModelLayout,
    *,
    name: str | None = None,
    block_weights: str | Mapping[str, float] | BlockWeights | None = None,
    strengths: Mapping[str, float] | None = None,
    strict: bool = False,
    allow_base_mismatch: bool = False,
    fallback: Callable[[str], LayerTarget | None] | None = None,
    fallback_name: str = "host",
) -> LoadPlan:
    """Resolve ``adapter`` on ``layout`` and parse ``block_weights``; refuses (before anything is
    written) a file for another base model unless ``allow_base_mismatch``, a strict load that
    would leave a module out, and a load that would change nothing (``NothingToApplyError``)."""
    if adapter.header_only:
        raise LohakrError(f"{adapter.source}: was read for inspection only (header_only=True); load it with "
                          "load_adapter(path) to apply it")
    matches, report = resolve(adapter, layout, strict=strict, check_base_model=not allow_base_mismatch,
                              fallback=fallback, fallback_name=fallback_name)
    report.adapter = name or adapter.name
    mismatch = "unknown" not in (adapter.base_model, layout.family) and adapter.base_model != layout.family
    if allow_base_mismatch and mismatch:
        report.warnings.insert(0, (
            f"{adapter.source}: a {BASE_MODEL_NAMES[adapter.base_model]} adapter ({adapter.base_model_evidence}) "
            f"applied to a {BASE_MODEL_NAMES[layout.family]} model because allow_base_mismatch is set"))
    if not matches:
        raise NothingToApplyError(_nothing_applies(adapter, report))
    for match in matches:  # a full diff's bias delta needs a bias: say so rather than drop it silently
        layer = match.target.layer
        if match.module.has_bias_delta and layer is not None and getattr(layer, "bias", None) is None:
            report.warnings.append(f"{adapter.source}: module {match.module.name}: diff_b is not applied, the layer "
                                   f"{match.target.key} has no bias (its weight delta is)")
    weights = parse_block_weights(block_weights, layout.blocks, layout.family)
    warning = zeroed_by_omission(weights, {m.block for m in matches})
    if warning:
        report.warnings.append(warning)
    report.strength = dict(strengths or {})
    report.block_weights = weights.spec
    return LoadPlan(adapter, matches, report, weights)


def _nothing_applies(adapter: Adapter, report: LoadReport) -> str:
    not_applied = report.not_applied
    text_encoder_only = all(o.block.startswith("TE") for o in not_applied if o.status == "unmatched")
    hint = ("its modules are for text encoders this model does not have here: give the loader the CLIP / text "
            "encoders too" if text_encoder_only and report.of("unmatched") else
            "check that the file is for this model")
    examples = "\n".join(f"  {o.module} [{o.status}] {o.reason}" for o in not_applied[:5])
    model = "model" if report.model_family == "unknown" else f"{BASE_MODEL_NAMES[report.model_family]} model"
    return (f"{adapter.source}: none of its {len(report.outcomes)} modules applies to this {model}, so loading it "
            f"would change nothing; {hint}. Nothing was patched.\n{examples}")


def log_report(report: LoadReport) -> None:
    """The report in the log: a summary line, then what was not applied and every warning."""
    logger.info("lohakr: %s", report.summary())
    if report.not_applied:
        logger.warning("lohakr: %s: %d module(s) not applied:\n%s", report.adapter, len(report.not_applied),
                       "\n".join(f"  {o.module} [{o.status}] {o.reason}" for o in report.not_applied[:20]))
    for text in report.warnings:
        logger.warning("lohakr: %s", text)


def composed_strength(component_strengths: Mapping[str, float], block_weights: BlockWeights, match: Match) -> float:
    """μ of one module, the one place strengths compose: its component's strength (text encoders
    share the CLIP strength in ComfyUI) times its block's weight (docs/names-and-blocks.md#block-weights)."""
    return component_strengths.get(match.target.component, 1.0) * block_weights(match.block)
