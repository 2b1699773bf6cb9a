"""The shared loader: parse LoHa/LoKr files, rebuild ΔW per layer, resolve names, patch weights.

Needs torch and safetensors to patch; diffusers only for the pipeline mixin. Nothing heavy is
imported before it is used (docs/architecture.md#who-owns-what).
"""

import importlib
from typing import Any

# Public name → the module that defines it. Imported on first use: describing a file needs neither
# torch nor diffusers (see lazy.py).
_PUBLIC: dict[str, str] = {
    "Adapter": "adapter",
    "AdapterFormatError": "errors",
    "AdapterMetadata": "metadata",
    "AdapterShapeError": "errors",
    "BakeAdapter": "bake",
    "BakeResult": "bake",
    "BaseModelMismatchError": "errors",
    "BlockWeights": "blocks",
    "BlockWeightsError": "errors",
    "DiffUpdate": "updates",
    "FusedAdapterError": "errors",
    "FusedPartlyError": "errors",
    "LayerTarget": "names",
    "LayerUpdate": "updates",
    "LoadPlan": "plan",
    "LoadReport": "report",
    "LohaUpdate": "updates",
    "LohakrError": "errors",
    "LokrUpdate": "updates",
    "LoraUpdate": "updates",
    "LycorisLoaderMixin": "diffusers_pipeline",
    "Match": "resolve",
    "ModelLayout": "names",
    "ModuleOutcome": "report",
    "NonFiniteUpdateError": "errors",
    "NothingToApplyError": "errors",
    "PatchedAdapter": "patcher",
    "SourceFileChangedError": "errors",
    "StrictLoadError": "errors",
    "WeightPatcher": "patcher",
    "bake": "bake",
    "enable": "diffusers_pipeline",
    "load_adapter": "adapter",
    "parse_block_weights": "blocks",
    "plan_load": "plan",
    "presets": "blocks",
    "resolve": "resolve",
    "split_key": "adapter",
}

__all__ = sorted(_PUBLIC)

# ``resolve`` is also a submodule's name: importing the submodule would set the package attribute to
# the module, so the function is bound here (this imports no torch).
from .resolve import resolve as resolve  # noqa: E402


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
