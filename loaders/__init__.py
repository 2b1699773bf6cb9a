"""The shared loader: parse LoHa/LoKr files, rebuild ΔW per layer, resolve names, patch weights.

torch + safetensors only; diffusers is imported lazily by the pipeline mixin.
"""

from .adapter import Adapter, load_adapter, split_key
from .diffusers_pipeline import LycorisLoaderMixin, enable
from .blocks import BlockWeights, parse_block_weights, presets
from .errors import (
    AdapterFormatError,
    AdapterShapeError,
    BaseModelMismatchError,
    BlockWeightsError,
    FusedAdapterError,
    FusedPartlyError,
    LohakrError,
    StrictLoadError,
)
from .metadata import AdapterMetadata
from .modules import AdapterModule, FullModule, LohaModule, LokrModule, LoraModule
from .names import LayerTarget, ModelLayout
from .patcher import PatchedAdapter, WeightPatcher
from .report import LoadReport, ModuleOutcome
from .resolve import Match, resolve

__all__ = [
    "Adapter", "AdapterFormatError", "AdapterMetadata", "AdapterModule", "AdapterShapeError",
    "BaseModelMismatchError", "BlockWeights", "BlockWeightsError", "FullModule", "FusedAdapterError",
    "FusedPartlyError", "LayerTarget",
    "LoadReport", "LohaModule", "LohakrError", "LokrModule", "LoraModule", "LycorisLoaderMixin", "Match",
    "ModelLayout", "PatchedAdapter", "WeightPatcher", "enable",
    "ModuleOutcome", "StrictLoadError", "load_adapter", "parse_block_weights", "presets", "resolve",
    "split_key",
]
