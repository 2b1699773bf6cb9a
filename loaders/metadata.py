"""Header metadata of an adapter file: decoded training args, tags, modelspec, base model (docs/format.md#metadata)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .families import FAMILIES
from .safe_json import JsonSyntaxError, parse_json

BASE_MODELS = ("sdxl", "sd1", "sd2", *FAMILIES, "unknown")
BASE_MODEL_NAMES = {"sdxl": "SDXL", "sd1": "SD1.5", "sd2": "SD2.x", **{f.id: f.name for f in FAMILIES.values()},
                    "unknown": "an unknown base model"}

# attn2 (cross-attention) to_k/to_v input width = the text encoder's hidden size.
CROSS_ATTENTION_WIDTH = {2048: "sdxl", 768: "sd1", 1024: "sd2"}


# Header fields holding JSON that lohakr reads.
JSON_FIELDS = ("ss_network_args", "ss_tag_frequency")


@dataclass
class AdapterMetadata:
    """The raw header plus the parts people ask about, decoded.

    The JSON fields are decoded once, when the header is read, with ``safe_json``'s limits: a
    bomb is refused there (``AdapterFormatError`` naming ``source`` and the field); a field that
    is simply not JSON is read as absent and listed in ``problems``."""

    raw: dict[str, str] = field(default_factory=dict)
    source: str = ""
    problems: list[str] = field(default_factory=list)
    _decoded: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for key in JSON_FIELDS:
            value = self.raw.get(key)
            if not value:
                continue
            try:
                self._decoded[key] = parse_json(value, self.source or "<header>", f"header field {key}")
            except JsonSyntaxError as err:
                self.problems.append(f"{err}; it is ignored")

    def _json(self, key: str) -> Any:
        return self._decoded.get(key)

    @property
    def training_args(self) -> dict[str, Any]:
        """``ss_network_args`` as a dict (values are the strings sd-scripts wrote)."""
        args = self._json("ss_network_args")
        return args if isinstance(args, dict) else {}

    @property
    def tag_frequency(self) -> Counter:
        """``ss_tag_frequency`` merged over datasets: tag → count."""
        counts: Counter = Counter()
        data = self._json("ss_tag_frequency")
        if isinstance(data, dict):
            for tags in data.values():
                if isinstance(tags, dict):
                    for tag, n in tags.items():
                        try:
                            counts[str(tag).strip()] += int(n)
                        except (TypeError, ValueError):
                            continue
        return counts

    def top_tags(self, n: int = 10) -> list[tuple[str, int]]:
        return self.tag_frequency.most_common(n)

    @property
    def modelspec(self) -> dict[str, str]:
        return {k[len("modelspec."):]: v for k, v in self.raw.items() if k.startswith("modelspec.")}

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.raw.get(key, default)

    @property
    def network_module(self) -> str | None:
        return self.raw.get("ss_network_module")

    @property
    def resolution(self) -> str | None:
        return self.raw.get("ss_resolution") or self.raw.get("modelspec.resolution")

    @property
    def wd_on_output(self) -> bool | None:
        """LyCORIS' DoRA axis flag, when the training args record it."""
        value = self.training_args.get("wd_on_output")
        if value is None:
            return None
        return str(value).strip().lower() in ("true", "1", "yes")

    def base_model_hint(self) -> tuple[str, str] | None:
        """``(base, evidence)`` from ``modelspec.architecture``, then ``ss_base_model_version``,
        then ``ss_v2``; ``None`` when the header says nothing."""
        arch = self.raw.get("modelspec.architecture", "")
        if arch:
            low = arch.lower()
            if "stable-diffusion-xl" in low:
                return "sdxl", f"modelspec.architecture = {arch}"
            if "stable-diffusion-v2" in low:
                return "sd2", f"modelspec.architecture = {arch}"
            if "stable-diffusion-v1" in low:
                return "sd1", f"modelspec.architecture = {arch}"
            for family in FAMILIES.values():
                if any(name in low for name in family.architectures):
                    return family.id, f"modelspec.architecture = {arch}"
        version = self.raw.get("ss_base_model_version", "")
        if version:
            if version.startswith("sdxl"):
                return "sdxl", f"ss_base_model_version = {version}"
            if version.startswith("sd_v2"):
                return "sd2", f"ss_base_model_version = {version}"
            if version.startswith("sd_v1"):
                return "sd1", f"ss_base_model_version = {version}"
            for family in FAMILIES.values():
                if any(version.lower().startswith(name) for name in family.architectures):
                    return family.id, f"ss_base_model_version = {version}"
        v2 = self.raw.get("ss_v2")
        if v2 == "True":
            return "sd2", "ss_v2 = True"
        return None


# Names only one transformer family's files have (families.py), then SDXL from kohya's second text
# encoder or its first beside UNet names. SGM UNet names (``lora_unet_input_blocks_…``) alone do not
# mean SDXL: converters write them for SD1.5 too. ``lora_te1_`` alone does not either: Flux.1 and
# SD3 files name CLIP-L so.
_FAMILY_NAMES = [(family.id, re.compile("|".join(family.name_patterns))) for family in FAMILIES.values()]
_TRANSFORMER_NAME = re.compile(  # a transformer's numbered blocks at the top (a UNet's are inside attentions)
    r"^(?:lora_unet_|lycoris_|lora_transformer_|transformer\.|(?:model\.)?diffusion_model\.|base_model\.model\."
    r"(?:transformer\.)?)?(?:double_blocks|single_blocks|joint_blocks|transformer_blocks|single_transformer_blocks)"
    r"[._]\d+|^lora_te3_")
_UNET_NAME = re.compile(r"(?:^|[._])(?:input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block)[._]")


def base_model_from_names(module_names: Iterable[str]) -> tuple[str, str] | None:
    """A transformer family from names only its files have; SDXL from kohya's text-encoder prefixes
    (``lora_te2_``, or ``lora_te1_`` beside UNet names) when no name is a transformer's."""
    names = list(module_names)
    for family, pattern in _FAMILY_NAMES:
        for name in names:
            if pattern.search(name):
                return family, f"module name {name}"
    if any(_TRANSFORMER_NAME.search(name) for name in names):
        return None
    unet = any(_UNET_NAME.search(name) for name in names)
    for name in names:
        if name.startswith("lora_te2_") or (unet and name.startswith("lora_te1_")):
            return "sdxl", f"key prefix of {name}"
    return None


def looks_like_a_transformer(module_names: Iterable[str]) -> bool:
    """True when some module name is a diffusion transformer's (then UNet cross-attention widths tell nothing)."""
    return any(_TRANSFORMER_NAME.search(name) or pattern.search(name) for name in module_names
               for _, pattern in _FAMILY_NAMES)


def base_model_from_widths(cross_attention_inputs: Iterable[tuple[str, int]]) -> tuple[str, str] | None:
    """From the input width of cross-attention to_k/to_v modules: 2048 SDXL, 768 SD1, 1024 SD2."""
    for name, width in cross_attention_inputs:
        base = CROSS_ATTENTION_WIDTH.get(width)
        if base:
            return base, f"{name} has {width} inputs"
    return None
