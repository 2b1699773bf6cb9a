"""The shared loader: parse LoHa/LoKr files, rebuild ΔW per layer, resolve names, patch weights.

torch + safetensors only; diffusers is imported lazily by the pipeline mixin.
"""

from .adapter import Adapter, load_adapter, split_key
from .blocks import BlockWeights, parse_block_weights, presets
from .diffusers_pipeline import LycorisLoaderMixin, enable
from .errors import (
    AdapterFormatError,
    AdapterShapeError,
    BaseModelMismatchError,
    BlockWeightsError,
    FusedAdapterError,
    FusedPartlyError,
    LohakrError,
    NonFiniteUpdateError,
    NothingToApplyError,
    StrictLoadError,
)
from .metadata import AdapterMetadata
from .names import LayerTarget, ModelLayout
from .patcher import PatchedAdapter, WeightPatcher
from .plan import LoadPlan, plan_load
from .report import LoadReport, ModuleOutcome
from .resolve import Match, resolve
from .updates import DiffUpdate, LayerUpdate, LohaUpdate, LokrUpdate, LoraUpdate

__all__ = [
    "Adapter", "AdapterFormatError", "AdapterMetadata", "AdapterShapeError", "BaseModelMismatchError", "BlockWeights",
    "BlockWeightsError", "DiffUpdate", "FusedAdapterError", "FusedPartlyError", "LayerTarget", "LayerUpdate",
    "LoadPlan", "LoadReport", "LohaUpdate", "LohakrError", "LokrUpdate", "LoraUpdate", "LycorisLoaderMixin", "Match",
    "ModelLayout", "ModuleOutcome", "NonFiniteUpdateError", "NothingToApplyError", "PatchedAdapter",
    "StrictLoadError", "WeightPatcher", "enable", "load_adapter", "parse_block_weights", "plan_load", "presets",
    "resolve", "split_key",
]
