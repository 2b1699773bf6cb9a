"""The bridge between the shared loader and ComfyUI's ModelPatcher. Imports comfy lazily.

A MODEL/CLIP pair becomes a ``ModelLayout`` (SGM UNet paths, HF CLIP paths, ComfyUI state-dict
keys as host keys); names the shared resolver does not know fall back to ComfyUI's own key maps.
Each applied module becomes one lazy patch, a ``WeightAdapterBase`` subclass whose
``calculate_weight`` calls the shared ``apply.add_to``: ComfyUI's patcher decides when and on
which device ΔW is built (full load, LowVRAM partial load, fp8 weights), and unpatches as for
any LoRA. No math lives here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..loaders import apply
from ..loaders.adapter import adapter_cache
from ..loaders.blocks import BlockWeights
from ..loaders.errors import LohakrError, NonFiniteUpdateError
from ..loaders.families import FAMILIES
from ..loaders.guard import check_layer, check_strength, provably_finite
from ..loaders.names import LayerTarget, ModelLayout, guess_block
from ..loaders.plan import LoadPlan, composed_strength, log_report, plan_load
from ..loaders.report import LoadReport
from ..loaders.updates import LayerUpdate

logger = logging.getLogger("lohakr")

FAMILY_OF_CONFIG = {"SDXL": "sdxl", "SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2",
                    "SDXLRefiner": "unknown", "Flux": "flux1", "FluxSchnell": "flux1", "FluxInpaint": "flux1",
                    "Chroma": "chroma", "Flux2": "flux2", "SD3": "sd3", "SD35": "sd3", "ZImage": "zimage",
                    "QwenImage": "qwenimage"}
CLIP_COMPONENTS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
# ComfyUI's text-encoder heads per transformer family → our components (docs/names-and-blocks.md#names);
# a family's language-model encoder is whichever head it has.
TRANSFORMER_TEXT_ENCODERS = {
    "flux1": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    "sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
}
MODEL_COMPONENTS = ("unet", "transformer")
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class StackItem:
    """One adapter to apply: file path, strengths, block weights."""

    path: str
    strength_model: float
    strength_clip: float
    block_weights: str | BlockWeights | None = None
    name: str | None = None


# -- layout ------------------------------------------------------------------------------------
def model_family(model: Any) -> str:
    config = getattr(getattr(model, "model", None), "model_config", None)
    return FAMILY_OF_CONFIG.get(type(config).__name__, "unknown") if config is not None else "unknown"


def comfy_layout(model: Any | None, clip: Any | None) -> ModelLayout:
    """The layout of a ComfyUI MODEL (``diffusion_model.*``) and CLIP (``clip_l.*``/``clip_g.*``…): a
    UNet's from its SGM paths, a transformer's from its original paths and its family's table."""
    unet: dict[str, tuple[tuple[int, ...], str]] = {}
    if model is not None:
        for key, tensor in model.model.state_dict().items():
            if key.startswith("diffusion_model.") and key.endswith(".weight") and tensor.dim() >= 2:
                unet[key[len("diffusion_model."):-len(".weight")]] = (tuple(tensor.shape), key)
        family = FAMILIES.get(model_family(model))
        if family is not None:
            return ModelLayout.from_original(family, unet, _transformer_text_encoders(family.id, clip))
    text_encoders: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    if clip is not None:
        for key, tensor in clip.cond_stage_model.state_dict().items():
            head, _, rest = key.partition(".transformer.")
            component = CLIP_COMPONENTS.get(head)
            if component is None or not rest.endswith(".weight") or tensor.dim() < 2 or "embeddings." in rest:
                continue
            text_encoders.setdefault(component, {})[rest[: -len(".weight")]] = (tuple(tensor.shape), key)
        if set(text_encoders) == {"text_encoder_2"}:  # a lone clip_g is the first text encoder
            text_encoders = {"text_encoder": text_encoders["text_encoder_2"]}
    family = model_family(model) if model is not None else ("sdxl" if "text_encoder_2" in text_encoders else "unknown")
    return ModelLayout.from_sgm(family, unet or None, text_encoders)


def _transformer_text_encoders(family: str, clip: Any | None) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """A transformer family's text-encoder layers by our component: ``{component: {path: (shape, key)}}``."""
    if clip is None:
        return {}
    heads = TRANSFORMER_TEXT_ENCODERS.get(family)
    layers: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    for key, tensor in clip.cond_stage_model.state_dict().items():
        head, _, rest = key.partition(".transformer.")
        component = heads.get(head) if heads is not None else "text_encoder"
        if component is None or not rest.endswith(".weight") or tensor.dim() < 2 or "embed" in rest:
            continue
        layers.setdefault(component, {})[rest[: -len(".weight")]] = (tuple(tensor.shape), key)
    return layers


def comfy_fallback(model: Any | None, clip: Any | None, layout: ModelLayout):
    """ComfyUI's own key maps (``comfy.lora.model_lora_keys_unet/clip``) for names we do not know."""
    import comfy.lora

    key_map: dict[str, str] = {}
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)
        shapes.update({k: (tuple(v.shape), "unet") for k, v in model.model.state_dict().items()})
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        shapes.update({k: (tuple(v.shape), "clip") for k, v in clip.cond_stage_model.state_dict().items()})

    def lookup(name: str) -> LayerTarget | None:
        host_key = key_map.get(name)
        if not isinstance(host_key, str) or host_key not in shapes:
            return None
        shape, part = shapes[host_key]
        if part == "unet":
            component = "transformer" if layout.family in FAMILIES else "unet"
        else:
            component = "text_encoder_2" if host_key.startswith("clip_g.") else "text_encoder"
        block = guess_block(name)
        if block == "?":
            block = "OTHER" if component in MODEL_COMPONENTS else ("TE2" if component == "text_encoder_2" else
                                                         ("TE1" if "TE1" in layout.blocks else "TE"))
        return LayerTarget(component, host_key, shape, block, host_key=host_key)

    return lookup


# -- the lazy patch ------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def weight_adapter_class() -> type | None:
    """Our ``WeightAdapterBase`` subclass, or ``None`` on a ComfyUI without ``comfy.weight_adapter``."""
    try:
        from comfy.weight_adapter.base import WeightAdapterBase
    except ImportError:
        return None

    class LohakrWeightAdapter(WeightAdapterBase):
        """One module of a LoHa/LoKr file as a ComfyUI patch; ΔW is built when ComfyUI asks."""

        name = "lohakr"

        def __init__(self, module: LayerUpdate, weight_shape: tuple[int, ...], bias: bool = False,
                     weight_dtype: torch.dtype = torch.float16):
            self.modules = [module]  # a file's modules for this weight: several for rows of a fused layer
            self.weight_shape = tuple(weight_shape)
            self.weight_dtype = weight_dtype  # the model weight's dtype, where the result ends
            self.bias = bias
            self.loaded_keys: set[str] = set()
            self.weights: list[torch.Tensor] = list(module.tensors().values())

        @property
        def module(self) -> LayerUpdate:
            return self.modules[0]

        def add(self, module: LayerUpdate) -> None:
            """Another module of the same file on this weight (rows of a fused layer)."""
            self.modules.append(module)
            self.weights += list(module.tensors().values())

        @classmethod
        def load(cls, *args, **kwargs):  # we never go through comfy.lora.load_lora
            return None

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            if offset is not None or not _is_identity(function):
                # lohakr adds whole-weight patches only: rows of a fused layer are PlacedUpdates
                # (docs/names-and-blocks.md#fused-and-split-layers), so ComfyUI never passes these
                raise LohakrError(f"{self.module.source}: module {self.module.name}: {key} was patched with an "
                                  "offset or function, which lohakr never registers")
            contributions = [(module, strength) for module in self.modules]
            with torch.no_grad():  # ComfyUI may patch with grad enabled: patching never depends on it
                result = self._patched(weight, contributions)
            if not self.bias and not provably_finite(contributions, self.weight_dtype) and not bool(
                    torch.isfinite(result.to(self.weight_dtype)).all()):
                raise NonFiniteUpdateError(f"{self.module.source}: module {self.module.name}: patching {key} at "
                                           f"strength {strength:g} would write NaN/inf; the weight was left as it was")
            return result

        def _patched(self, weight, contributions):
            if self.bias:
                delta = apply.patched_bias(torch.zeros(weight.shape[0], device=weight.device), contributions)
                if delta is not None:
                    weight += delta.to(weight.dtype)
                return weight
            work = weight if weight.dtype == torch.float32 else weight.to(torch.float32)
            apply.patch(work, work, contributions)
            if work is not weight:
                weight.copy_(work)
            return weight

    return LohakrWeightAdapter


def _is_identity(function: Any) -> bool:
    if function is None:
        return True
    probe = torch.empty(0)
    try:
        return function(probe) is probe
    except Exception:  # noqa: BLE001 - a function that fails on a probe is not the identity
        return False


def _patch_value(module: LayerUpdate, target: LayerTarget, weight_dtype: torch.dtype, bias: bool = False):
    adapter_class = weight_adapter_class()
    if adapter_class is not None:
        return adapter_class(module, target.weight_shape, bias, weight_dtype)
    # Old ComfyUI: a precomputed diff (built now, on the CPU, one layer at a time).
    if bias:
        return ("diff", (module.bias_delta("cpu"),))
    return ("diff", (module.delta(target.weight_shape, "cpu"),))


# -- applying ------------------------------------------------------------------------------------
def apply_stack(model: Any | None, clip: Any | None, items: Iterable[StackItem],
                strict: bool = False, allow_base_mismatch: bool = False) -> tuple[Any, Any, list[LoadReport]]:
    """Apply adapters to clones of ``model``/``clip`` (one clone each for the whole stack).

    Strength 0 on a side returns that input untouched. Every refusal (file, base model, strict,
    nothing applies, a patch that would write NaN/inf) is raised as ``LohakrError`` before any
    patch is added: the inputs are never changed."""
    items = list(items)
    for item in items:
        item.strength_model = check_strength(item.strength_model, f"{item.name or item.path}: strength_model")
        item.strength_clip = check_strength(item.strength_clip, f"{item.name or item.path}: strength_clip")
    use_model = model is not None and any(i.strength_model != 0 for i in items)
    use_clip = clip is not None and any(i.strength_clip != 0 for i in items)
    if not items or not (use_model or use_clip):
        return model, clip, []
    if weight_adapter_class() is None:
        logger.warning("lohakr: this ComfyUI has no comfy.weight_adapter; falling back to precomputed diff "
                       "patches (more memory, no lazy ΔW). Update ComfyUI for lazy patching.")
    layout = comfy_layout(model, clip)
    fallback = comfy_fallback(model, clip, layout)
    planned: list[tuple[StackItem, LoadPlan]] = []
    for item in items:
        plan = plan_load(adapter_cache.load(item.path), layout, name=item.name, block_weights=item.block_weights,
                         strengths={"model": item.strength_model, "clip": item.strength_clip}, strict=strict,
                         allow_base_mismatch=allow_base_mismatch, fallback=fallback, fallback_name="comfy")
        planned.append((item, plan))

    host_weights = _host_weights(model if use_model else None, clip if use_clip else None)
    sides = set(MODEL_COMPONENTS) if use_model else set()
    sides |= set(TEXT_ENCODER_COMPONENTS) if use_clip else set()
    on_weight: dict[str, list[tuple[LayerUpdate, float]]] = {}  # every module and strength on a host weight
    groups_per_item = [_patch_groups(item, plan, sides, host_weights, on_weight) for item, plan in planned]
    _check_finite(host_weights, on_weight)

    new_model = model.clone() if use_model else model
    new_clip = clip.clone() if use_clip else clip
    reports = []
    for (_, plan), groups in zip(planned, groups_per_item, strict=True):
        for (is_clip, strength), patches in groups.items():
            receiver = new_clip if is_clip else new_model
            accepted = set(receiver.add_patches(patches, strength))
            dropped = set(patches) - accepted
            if dropped:
                refused = ", ".join(sorted(dropped)[:5])
                raise LohakrError(f"{plan.adapter.source}: ComfyUI refused patches for {refused}")
        reports.append(plan.report)
        log_report(plan.report)
    return new_model, new_clip, reports


def save_stack_as_lora(model: Any, clip: Any | None, items: Iterable[StackItem], output: str,
                       rank: int | str = "exact", max_error: float | None = None, dtype: str | None = None):
    """The stack, at its strengths and block weights, as one LoRA file at ``output`` (written
    atomically; ``convert.merge_plans``): exact where the summed ranks allow, else SVD at ``rank`` or
    ``max_error``. Returns the ``FileConversion`` (per module its method, rank and error). The same
    refusals as a load, before anything is written. A DoRA module keeps its magnitude where it can,
    else is baked through the model's weights (``convert.merge_plans``)."""
    from ..loaders.convert import MergeItem, merge_plans

    items = [item for item in items if item.strength_model != 0 or item.strength_clip != 0]
    if not items:
        raise LohakrError("the stack is empty (or every strength is 0): nothing to save")
    layout = comfy_layout(model, clip)
    merged = []
    for item in items:
        strengths = _component_strengths(item)
        plan = plan_load(adapter_cache.load(item.path), layout, name=item.name, block_weights=item.block_weights,
                         strengths={"model": item.strength_model, "clip": item.strength_clip})
        strength_of = functools.partial(composed_strength, strengths, plan.block_weights)
        merged.append(MergeItem(plan.adapter, plan, strength_of, {"model": item.strength_model,
                                                                  "clip": item.strength_clip}))
    weights = _host_weights(model, clip)
    conversion = merge_plans(merged, layout, rank, max_error, dtype,
                             base_weight=lambda target: weights.get(target.host_key))
    conversion.write(output, [item.path for item in items])
    return conversion


def _patch_groups(item: StackItem, plan: LoadPlan, sides: set[str], host_weights: dict[str, torch.Tensor],
                  on_weight: dict[str, list[tuple[LayerUpdate, float]]]) -> dict[tuple[bool, float], dict[str, Any]]:
    """One stack item's patch values, grouped by (CLIP side, strength) as ``add_patches`` takes them;
    each module and its strength is also recorded per host weight in ``on_weight``. ``sides``: the
    components patched at all (a side at strength 0 everywhere is left out)."""
    component_strengths = _component_strengths(item)
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for match in plan.matches:
        if match.target.component not in sides:
            continue
        strength = composed_strength(component_strengths, plan.block_weights, match)
        if strength == 0:
            continue
        host_key = match.target.host_key
        on_weight.setdefault(host_key, []).append((match.module, strength))
        patches = groups.setdefault((match.target.component not in MODEL_COMPONENTS, strength), {})
        dtype = host_weights[host_key].dtype
        keys = [host_key] + ([host_key[: -len("weight")] + "bias"] if match.module.has_bias_delta else [])
        for key, bias in zip(keys, (False, True), strict=False):
            if key in patches:  # rows of a fused layer, from several modules of the file: one patch
                _add_to_patch(patches, key, match.module, match.target, dtype, bias)
            else:
                patches[key] = _patch_value(match.module, match.target, dtype, bias)
    return groups


def _component_strengths(item: StackItem) -> dict[str, float]:
    """A stack item's strength per component: the model's for the denoiser, CLIP's for every text encoder."""
    return {**dict.fromkeys(MODEL_COMPONENTS, item.strength_model),
            **dict.fromkeys(TEXT_ENCODER_COMPONENTS, item.strength_clip)}


def _add_to_patch(patches: dict[str, Any], key: str, module: LayerUpdate, target: LayerTarget,
                  dtype: torch.dtype, bias: bool) -> None:
    """Another module's contribution to the patch already made for ``key``."""
    value = patches[key]
    if isinstance(value, tuple):  # old ComfyUI: precomputed diffs add up
        extra = _patch_value(module, target, dtype, bias)
        patches[key] = ("diff", (value[1][0] + extra[1][0],))
    else:
        value.add(module)


def _host_weights(model: Any | None, clip: Any | None) -> dict[str, torch.Tensor]:
    """The host's weights by state-dict key (no copies)."""
    weights: dict[str, torch.Tensor] = {}
    if model is not None:
        weights.update(model.model.state_dict(keep_vars=True))
    if clip is not None:
        weights.update(clip.cond_stage_model.state_dict(keep_vars=True))
    return weights


def _check_finite(host_weights: dict[str, torch.Tensor],
                  on_weight: dict[str, list[tuple[LayerUpdate, float]]]) -> None:
    """The write guard (``loaders/guard.py``) for every host weight the stack patches, against the
    model's own weight and dtype: refuses before any patch is added."""
    for host_key, contributions in on_weight.items():
        weight = host_weights[host_key].detach()

        check_layer(host_key, weight, weight, contributions)
