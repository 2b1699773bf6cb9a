"""PEFT's LoHa/LoKr files: alpha and rank live in ``adapter_config.json``, not in the weights
(docs/format.md#peft-alpha-and-r).

PEFT saves ``adapter_model.safetensors`` with keys ``base_model.model.<path>.hada_w1_a`` and puts
``r``, ``alpha`` and the per-module ``rank_pattern`` / ``alpha_pattern`` in the JSON beside it. It
scales every module by ``alpha / r`` with that ``r``, LoKr with both factors full included
(docs/format.md#peft-alpha-and-r, where every other tool uses 1). Without the config the scale is unknown; the loader
then says so instead of guessing.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import AdapterFormatError
from .safe_json import MAX_JSON_BYTES, parse_json

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
PEFT_KINDS = {"LOHA": "loha", "LOKR": "lokr"}


def is_peft_name(module_name: str) -> bool:
    return module_name.startswith(PEFT_PREFIX)


def config_beside(path: str | os.PathLike) -> Path | None:
    """The ``adapter_config.json`` PEFT saves in the same folder as the weights, if there is one."""
    candidate = Path(path).with_name(CONFIG_NAME)
    return candidate if candidate.is_file() else None


def read_config(config: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, Any], str]:
    """The config as a dict, and where it came from (for messages)."""
    if isinstance(config, Mapping):
        return dict(config), "peft_config"
    source = os.fspath(config)
    try:
        with open(source, "rb") as handle:
            text = handle.read(MAX_JSON_BYTES + 1)
    except OSError as err:
        raise AdapterFormatError(f"{source}: cannot read the PEFT config ({err.strerror or err})") from err
    data = parse_json(text, source, "the PEFT config")
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{source}: a PEFT config is a JSON object, this is {type(data).__name__}")
    return data, source


# A quantifier on a group (``(a+)+``, ``(a|aa)*``) can make a regular expression take exponential
# time on a short path; PEFT writes module names (at most ``.*``) as patterns, so such keys are refused.
_QUANTIFIED_GROUP = re.compile(r"\)\s*(?:[*+]|\{\d)")
MAX_PATTERN_LENGTH = 1000


def pattern_value(patterns: Mapping[str, Any], module_path: str, default: Any, source: str) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the whole
    module path or a dotted suffix of it (as ``peft.utils.get_pattern_key``), else ``default``."""
    for pattern, value in patterns.items():
        if len(pattern) > MAX_PATTERN_LENGTH or _QUANTIFIED_GROUP.search(pattern):
            raise AdapterFormatError(
                f"{source}: pattern {pattern[:80]!r} is too long or repeats a group, which can take exponential "
                "time to match; PEFT writes module names there. Fix or remove that key of the config"
            )
        try:
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                return value
        except re.error as err:
            raise AdapterFormatError(
                f"{source}: pattern {pattern!r} is not a valid regular expression ({err})") from err
    return default


def _number(value: Any, what: str, source: str, module_path: str | None = None) -> float:
    where = f" for {module_path}" if module_path else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterFormatError(f"{source}: {what}{where} is {value!r}; PEFT writes a finite number there")
    return float(value)


def apply_config(modules: Mapping[str, Any], config: Mapping[str, Any], source: str) -> int:
    """Give every module without a stored alpha PEFT's alpha and r (``config_rank``), looked up by
    its path in the model (the PEFT prefix removed). Returns how many modules got them. Refuses a
    config of another PEFT type, or one whose r disagrees with a module's shapes: a config that
    belongs to other weights."""
    peft_type = str(config.get("peft_type", "")).upper()
    kind = PEFT_KINDS.get(peft_type)
    if kind is None:
        raise AdapterFormatError(
            f"{source}: peft_type is {config.get('peft_type')!r}; lohakr reads the configs of PEFT LoHa "
            "and LoKr adapters (peft_type LOHA or LOKR)"
        )
    rank_patterns = config.get("rank_pattern") or {}
    alpha_patterns = config.get("alpha_pattern") or {}
    for field_name, patterns in (("rank_pattern", rank_patterns), ("alpha_pattern", alpha_patterns)):
        if not isinstance(patterns, Mapping) or not all(isinstance(k, str) for k in patterns):
            raise AdapterFormatError(
                f"{source}: {field_name} is {type(patterns).__name__}; PEFT writes an object of module "
                "name patterns to numbers there"
            )
    count = 0
    for name, module in modules.items():
        if module.alpha is not None or not module.uses_alpha:
            continue
        if module.kind != kind:
            raise AdapterFormatError(
                f"{source}: says {peft_type} but module {name} holds {module.kind} factors; "
                "this config belongs to another adapter"
            )
        path = name[len(PEFT_PREFIX):] if is_peft_name(name) else name
        rank = _number(pattern_value(rank_patterns, path, config.get("r"), source), "r", source, path)
        if rank <= 0 or rank != int(rank):
            raise AdapterFormatError(f"{source}: r for {path} is {rank:g}; a rank is a positive integer")
        if module.rank is not None and module.rank != rank:
            raise AdapterFormatError(
                f"{source}: r for {path} is {rank:g} but the weights of {name} have rank {module.rank}; "
                "this config belongs to other weights (PEFT saves the two side by side)"
            )
        module.alpha = _number(pattern_value(alpha_patterns, path, config.get("alpha"), source), "alpha", source, path)
        module.config_rank = int(rank)
        count += 1
    return count
