"""Resolve file module names to live model layers (docs/names-and-blocks.md#naming-styles).

A ``ModelLayout`` is built from the live module tree of diffusers components (UNet, CLIP text
encoders), never by rewriting ``_`` to ``.``: every Linear/Conv layer registers each name it can
appear under in a file: kohya diffusers-style (``lora_unet_down_blocks_…``), kohya SGM
(``lora_unet_input_blocks_…``, generated from the UNet's own block structure), ``lycoris_``
(SimpleTuner), and dotted diffusers/PEFT names. Every layer also knows its block (IN04, M00, TE2…).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .families import FAMILIES, SWAPPED_IF_TWO_HALVES, Original, TransformerFamily
from .lazy import lazy_module

nn = lazy_module("torch.nn")

if TYPE_CHECKING:
    from torch import nn  # noqa: F811

RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
SGM_TO_RESNET = {v: k for k, v in RESNET_TO_SGM.items()}
TEXT_ENCODER_PREFIXES = {
    ("sd", "text_encoder"): ("lora_te_", "lora_te1_"),
    ("sdxl", "text_encoder"): ("lora_te1_", "lora_te_"),
    ("sdxl", "text_encoder_2"): ("lora_te2_",),
}


@dataclass(eq=False)
class LayerTarget:
    """One patchable layer of the model: where it lives, its weight shape and its block."""

    component: str
    path: str
    weight_shape: tuple[int, ...]
    block: str
    layer: nn.Module | None = None
    sgm_path: str | None = None
    host_key: str | None = None  # the host's own key for this weight (ComfyUI state-dict key)

    @functools.cached_property
    def key(self) -> str:
        """``component.path``, unique in the layout (``unet.down_blocks.1.attentions.0…``)."""
        return f"{self.component}.{self.path}"


@dataclass(frozen=True)
class LayerPart:
    """Where some output rows of a file module go: ``rows`` of the layer ``target`` (``None``: all of
    its rows). A module named as a fused layer the model splits (BFL's ``img_attn.qkv`` on diffusers'
    ``to_q``/``to_k``/``to_v``) has one part per layer, its rows in order
    (docs/names-and-blocks.md#fused-and-split-layers)."""

    target: LayerTarget
    rows: tuple[int, int] | None = None

    @property
    def height(self) -> int:
        return self.target.weight_shape[0] if self.rows is None else self.rows[1] - self.rows[0]


@dataclass(eq=False)
class ModelLayout:
    """All patchable layers of a model, with every alias a file may use for them."""

    family: str
    targets: dict[str, LayerTarget]
    aliases: dict[str, str] = field(default_factory=dict)
    blocks: list[str] = field(default_factory=list)
    components: dict[str, nn.Module] = field(default_factory=dict)
    # names of fused (or reordered) layers: name → [(target key, target rows or None)], rows in order
    composites: dict[str, list[tuple[str, tuple[int, int] | None]]] = field(default_factory=dict)

    def resolve(self, module_name: str) -> LayerTarget | None:
        key = self.aliases.get(module_name)
        return self.targets[key] if key is not None else None

    def resolve_parts(self, module_name: str) -> list[LayerPart] | None:
        """The parts a module name covers: one whole layer for a plain alias, several for a composite."""
        key = self.aliases.get(module_name)
        if key is not None:
            return [LayerPart(self.targets[key])]
        parts = self.composites.get(module_name)
        if parts is None:
            return None
        return [LayerPart(self.targets[key], rows) for key, rows in parts]

    def register(self, target: LayerTarget, names: list[str]) -> None:
        self.targets[target.key] = target
        for name in names:
            if name not in self.composites:
                self.aliases.setdefault(name, target.key)

    def register_composite(self, parts: list[tuple[str, tuple[int, int] | None]], names: list[str]) -> None:
        for name in names:
            if name not in self.aliases:
                self.composites.setdefault(name, parts)

    @classmethod
    def from_transformer(cls, transformer: nn.Module, family: TransformerFamily,
                         text_encoders: Mapping[str, nn.Module] | None = None) -> ModelLayout:
        """The layout of a diffusion transformer (Flux.1, Flux.2, SD3, Z-Image, Qwen-Image) and its
        text encoders, from the live modules and the family's tables (``families.py``)."""
        layout = cls(family=family.id, targets={})
        encoders = {c: m for c, m in (text_encoders or {}).items() if m is not None and c in family.text_encoders}
        for component, model in encoders.items():
            layout.components[component] = model
            block = family.text_encoder_block(component)
            for path, layer in patchable_layers(model):
                layout.targets[f"{component}.{path}"] = LayerTarget(component, path, tuple(layer.weight.shape), block,
                                                                     layer)
        layout.components["transformer"] = transformer
        for path, layer in patchable_layers(transformer):
            layout.targets[f"transformer.{path}"] = LayerTarget("transformer", path, tuple(layer.weight.shape),
                                                                family.block_of(path), layer)
        _register_transformer_names(layout, family)
        return layout

    @classmethod
    def from_original(cls, family: TransformerFamily, layers: Mapping[str, tuple[tuple[int, ...], str]],
                      text_encoders: Mapping[str, Mapping[str, tuple[tuple[int, ...], str]]] | None = None
                      ) -> ModelLayout:
        """The layout of a transformer as hosts with the original layer names have it (ComfyUI's
        ``diffusion_model.double_blocks…``): ``{original path: (weight shape, host key)}``, text
        encoders as ``{component: {path: (shape, host key)}}``. diffusers names of layers the original
        fuses resolve to rows of the fused layer: of ``n`` fused layers, each but the last has as many
        rows as the layer has inputs (q, k, v), the last the rest (Flux.1's MLP in ``linear1``)."""
        layout = cls(family=family.id, targets={})
        for component, encoder_layers in (text_encoders or {}).items():
            block = family.text_encoder_block(component)
            prefixes = family.text_encoders.get(component, ())
            for path, (shape, host_key) in encoder_layers.items():
                target = LayerTarget(component, path, tuple(shape), block, host_key=host_key)
                layout.register(target, _text_encoder_names(component, path, prefixes))
        for path, (shape, host_key) in layers.items():
            target = LayerTarget("transformer", path, tuple(shape), family.block_of(path, original=True),
                                 host_key=host_key)
            layout.register(target, _original_layer_names(path))
        for original, spec in _original_names(family, [path + "." for path in layers], original_side=True):
            target = layout.targets.get(f"transformer.{original}")
            if target is not None:
                _register_diffusers_names(layout, target, spec)
        for path in layers:  # layers both schemes name alike (most of Z-Image and Qwen-Image)
            layout.register(layout.targets[f"transformer.{path}"], _transformer_names(path))
        _set_transformer_blocks(layout, family)
        return layout

    @classmethod
    def from_diffusers(
        cls,
        unet: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        text_encoder_2: nn.Module | None = None,
    ) -> ModelLayout:
        """Build the layout of an SD1.x/SD2.x/SDXL diffusers model from its live components."""
        family = detect_family(unet, text_encoder_2)
        layout = cls(family=family, targets={})
        te_style = "sdxl" if text_encoder_2 is not None else "sd"
        for component, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
            if model is None:
                continue
            layout.components[component] = model
            block = "TE" if te_style == "sd" else ("TE1" if component == "text_encoder" else "TE2")
            prefixes = TEXT_ENCODER_PREFIXES[(te_style, component)]
            for path, layer in patchable_layers(model):
                target = LayerTarget(component, path, tuple(layer.weight.shape), block, layer)
                layout.register(target, _text_encoder_names(component, path, prefixes))
        sgm = None
        if unet is not None:
            layout.components["unet"] = unet
            sgm = SgmNames(unet)
            for path, layer in patchable_layers(unet):
                sgm_path = sgm.to_sgm(path)
                target = LayerTarget(
                    "unet", path, tuple(layer.weight.shape), block_of_sgm(sgm_path), layer, sgm_path
                )
                layout.register(target, _unet_names(path, sgm_path))
        layout.blocks = _ordered_blocks({t.block for t in layout.targets.values()}, sgm)
        return layout

    @classmethod
    def from_sgm(
        cls,
        family: str,
        unet: Mapping[str, tuple[tuple[int, ...], str]] | None = None,
        text_encoders: Mapping[str, Mapping[str, tuple[tuple[int, ...], str]]] | None = None,
    ) -> ModelLayout:
        """Build a layout from weight shapes keyed by SGM UNet paths and HF CLIP paths, as hosts
        with an LDM-style UNet (ComfyUI) have them: ``{path: (weight shape, host key)}``.
        ``text_encoders`` maps ``text_encoder`` / ``text_encoder_2`` to their layers."""
        layout = cls(family=family, targets={})
        text_encoders = text_encoders or {}
        te_style = "sdxl" if "text_encoder_2" in text_encoders or family == "sdxl" else "sd"
        for component, layers in text_encoders.items():
            block = "TE" if te_style == "sd" else ("TE1" if component == "text_encoder" else "TE2")
            prefixes = TEXT_ENCODER_PREFIXES[(te_style, component)]
            for path, (shape, host_key) in layers.items():
                target = LayerTarget(component, path, tuple(shape), block, host_key=host_key)
                layout.register(target, _text_encoder_names(component, path, prefixes))
        sgm = None
        if unet:
            sgm = SgmNames(UnetStructure.from_sgm_paths(unet))
            for sgm_path, (shape, host_key) in unet.items():
                path = sgm.to_diffusers(sgm_path) or sgm_path
                target = LayerTarget("unet", path, tuple(shape), block_of_sgm(sgm_path), None, sgm_path, host_key)
                layout.register(target, _unet_names(path, sgm_path))
        layout.blocks = _ordered_blocks({t.block for t in layout.targets.values()}, sgm)
        return layout


    @classmethod
    def from_checkpoint(cls, keys: Mapping[str, tuple[int, ...]]) -> ModelLayout:
        """The layout of an SD1.x/SDXL single-file checkpoint (original SGM keys, as A1111 and
        ComfyUI load it) from its tensor shapes: the UNet under ``model.diffusion_model.``, CLIP-L
        under ``cond_stage_model.transformer.`` (SD1) or ``conditioner.embedders.0.transformer.``
        (SDXL), OpenCLIP bigG under ``conditioner.embedders.1.model.`` with its q/k/v fused into
        ``in_proj_weight`` (docs/architecture.md#baking). Host keys are the checkpoint's keys."""
        unet: dict[str, tuple[tuple[int, ...], str]] = {}
        clip_l: dict[str, tuple[tuple[int, ...], str]] = {}
        open_clip: dict[str, tuple[tuple[int, ...], str]] = {}
        for key, shape in keys.items():
            if len(shape) < 2:
                continue
            if key.startswith(CHECKPOINT_UNET) and key.endswith(".weight"):
                unet[key[len(CHECKPOINT_UNET):-len(".weight")]] = (tuple(shape), key)
            elif key.startswith(CHECKPOINT_CLIP_L) and key.endswith(".weight") and "embeddings." not in key:
                clip_l[key.split(".transformer.", 1)[1][:-len(".weight")]] = (tuple(shape), key)
            elif key.startswith(CHECKPOINT_OPEN_CLIP) and key.endswith("weight") and ".resblocks." in key:
                open_clip[key[len(CHECKPOINT_OPEN_CLIP):]] = (tuple(shape), key)
        width = next((shape[1] for path, (shape, _) in unet.items() if path.endswith("attn2.to_k")), None)
        family = "sdxl" if open_clip else {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width, "unknown")
        layout = cls.from_sgm(family, unet or None, {"text_encoder": clip_l} if clip_l else None)
        for path, (shape, key) in open_clip.items():
            _register_open_clip(layout, path, shape, key)
        if open_clip and "TE2" not in layout.blocks:
            layout.blocks.insert(layout.blocks.index("TE1") + 1 if "TE1" in layout.blocks else 0, "TE2")
        return layout

    def to_table(self) -> dict:
        """The layout as data (no live layers): family, blocks, and per layer its component, path,
        weight shape, block and SGM path. ``from_table`` rebuilds every alias from it."""
        rows = [[t.component, t.path, list(t.weight_shape), t.block, t.sgm_path] for t in self.targets.values()]
        return {"family": self.family, "blocks": list(self.blocks), "layers": rows}

    @classmethod
    def from_table(cls, table: Mapping) -> ModelLayout:
        """A layout from ``to_table``'s data: the same names resolve to the same shapes and blocks,
        without building a model (``python -m lohakr info`` uses the tables of the reference models)."""
        layout = cls(family=table["family"], targets={}, blocks=list(table["blocks"]))
        family = FAMILIES.get(layout.family)
        if family is not None:  # a transformer: its names follow from the shapes and the family table
            for component, path, shape, block, _ in table["layers"]:
                layout.targets[f"{component}.{path}"] = LayerTarget(component, path, tuple(shape), block)
            _register_transformer_names(layout, family)
            return layout
        components = {row[0] for row in table["layers"]}
        te_style = "sdxl" if "text_encoder_2" in components else "sd"
        for component, path, shape, block, sgm_path in table["layers"]:
            target = LayerTarget(component, path, tuple(shape), block, sgm_path=sgm_path)
            if component == "unet":
                names = _unet_names(path, sgm_path)
            else:
                names = _text_encoder_names(component, path, TEXT_ENCODER_PREFIXES[(te_style, component)])
            layout.register(target, names)
        return layout


CHECKPOINT_UNET = "model.diffusion_model."
CHECKPOINT_CLIP_L = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
CHECKPOINT_OPEN_CLIP = "conditioner.embedders.1.model."
# OpenCLIP bigG (SDXL's second text encoder in a single-file checkpoint) ↔ its transformers layers
_OPEN_CLIP = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|"
                        r"mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")
_OPEN_CLIP_LAYERS = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                     "mlp.c_proj.weight": "mlp.fc2"}


def _register_open_clip(layout: ModelLayout, path: str, shape: tuple[int, ...], key: str) -> None:
    """One OpenCLIP bigG layer of a checkpoint: its transformers names as aliases, or, for the fused
    ``in_proj_weight``, q/k/v as thirds of its rows (docs/names-and-blocks.md#fused-and-split-layers).
    Its ``text_projection`` is a transposed parameter, not a Linear: not a target."""
    match = _OPEN_CLIP.match(path)
    if match is None:
        return
    number, inner = match.groups()
    target = LayerTarget("text_encoder_2", path.removesuffix(".weight").removesuffix("_weight"), tuple(shape), "TE2",
                         host_key=key)
    prefixes = TEXT_ENCODER_PREFIXES[("sdxl", "text_encoder_2")]
    layer = f"text_model.encoder.layers.{number}"
    layout.targets[target.key] = target
    if inner != "attn.in_proj_weight":
        layout.register(target, _text_encoder_names("text_encoder_2", f"{layer}.{_OPEN_CLIP_LAYERS[inner]}", prefixes))
        return
    third = shape[0] // 3
    for n, projection in enumerate(("q_proj", "k_proj", "v_proj")):
        names = _text_encoder_names("text_encoder_2", f"{layer}.self_attn.{projection}", prefixes)
        layout.register_composite([(target.key, (n * third, (n + 1) * third))], names)


def patchable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, layer)`` for every Linear/Conv; a PEFT wrapper yields its base layer under its
    own path, and nothing inside the wrapper is yielded."""
    patchable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    wrappers: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrappers):
            continue
        base = module.get_base_layer() if hasattr(module, "base_layer") and hasattr(module, "get_base_layer") else None
        if base is not None and base is not module:
            wrappers.append(path)
            module = base
        if isinstance(module, patchable) and getattr(module, "weight", None) is not None:
            yield path, module


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _register_transformer_names(layout: ModelLayout, family: TransformerFamily) -> None:
    """Every name of a transformer layout's targets (diffusers paths): its text encoders' prefixed
    names, the diffusers styles, the original names of the family's table (fused layers as
    composites), then diffusers paths under the original prefixes; and its blocks."""
    targets = list(layout.targets.values())
    for target in targets:
        if target.component != "transformer":
            prefixes = family.text_encoders.get(target.component, ())
            layout.register(target, _text_encoder_names(target.component, target.path, prefixes))
    paths = [t.path for t in targets if t.component == "transformer"]
    for target in targets:
        if target.component == "transformer":
            layout.register(target, _transformer_names(target.path))
    for original, spec in _original_names(family, [path + "." for path in paths]):
        _register_original(layout, original, spec)
    for path in paths:
        layout.register(layout.targets[f"transformer.{path}"], [f"diffusion_model.{path}",
                                                                f"lora_unet_{_underscored(path)}"])
    _set_transformer_blocks(layout, family)


def _transformer_names(path: str) -> list[str]:
    """diffusers/PEFT dotted (bare, ``transformer.``, ``base_model.model.``), LyCORIS/SimpleTuner
    ``lycoris_`` and OneTrainer ``lora_transformer_`` names of a transformer layer."""
    flat = _underscored(path)
    return [path, f"transformer.{path}", f"base_model.model.{path}", f"base_model.model.transformer.{path}",
            f"lycoris_{flat}", f"lora_transformer_{flat}"]


def _original_layer_names(path: str) -> list[str]:
    """kohya ``lora_unet_``, ai-toolkit/ComfyUI ``diffusion_model.`` and bare names of an original path."""
    return [f"lora_unet_{_underscored(path)}", f"diffusion_model.{path}", f"model.diffusion_model.{path}", path,
            f"base_model.model.{path}", f"lycoris_{_underscored(path)}"]


def _original_names(family: TransformerFamily, paths: list[str],
                    original_side: bool = False) -> Iterator[tuple[str, Original]]:
    """``(original path, diffusers spec)`` for every original layer name of the family's tables,
    for the blocks the model has (``paths``: diffusers paths, or original ones)."""
    for scope in family.scopes:
        prefix = (scope.original or scope.diffusers) if original_side else scope.diffusers
        numbered = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
        indices = sorted({int(m.group(1)) for p in paths if (m := numbered.match(p))})
        for i in indices:
            inside = f"{scope.diffusers}.{i}."
            for original, spec in scope.layers.items():
                yield f"{scope.original or scope.diffusers}.{i}.{original}", _prefixed(inside, spec)
    yield from family.top_level.items()


def _prefixed(prefix: str, spec: Original) -> Original:
    if isinstance(spec, str):
        return prefix + spec
    if isinstance(spec, tuple):
        return (prefix + spec[0], spec[1])
    return [prefix + part for part in spec]


def _register_original(layout: ModelLayout, original: str, spec: Original) -> None:
    """Register an original name: an alias of one layer, or a composite of fused or reordered parts.
    A rule whose layers this model lacks (SD3.5 Medium's ``attn2`` in other blocks) is left out."""
    names = _original_layer_names(original)
    targets = layout.targets
    if isinstance(spec, str):
        if f"transformer.{spec}" in targets:
            layout.register(targets[f"transformer.{spec}"], names)
        return
    if isinstance(spec, tuple):
        target = targets.get(f"transformer.{spec[0]}")
        if target is not None:
            _register_halves(layout, target, spec[1], names)
        return
    keys = [f"transformer.{path}" for path in spec]
    if all(key in targets for key in keys):
        layout.register_composite([(key, None) for key in keys], names)


def _register_diffusers_names(layout: ModelLayout, target: LayerTarget, spec: Original) -> None:
    """The diffusers names of an original layer ``target``: aliases of it, or rows of it where the
    original fuses several diffusers layers or orders its halves otherwise."""
    if isinstance(spec, str):
        layout.register(target, _transformer_names(spec))
        return
    if isinstance(spec, tuple):
        _register_halves(layout, target, spec[1], _transformer_names(spec[0]))
        return
    rows, width = target.weight_shape[0], math.prod(target.weight_shape[1:])
    last = rows - width * (len(spec) - 1)
    if last <= 0:
        return
    start = 0
    for n, path in enumerate(spec):
        height = last if n == len(spec) - 1 else width
        layout.register_composite([(target.key, (start, start + height))], _transformer_names(path))
        start += height


def _register_halves(layout: ModelLayout, target: LayerTarget, how: str, names: list[str]) -> None:
    """``names`` for ``target`` with its two halves swapped (the same in both directions); under
    ``SWAPPED_IF_TWO_HALVES`` only where the layer has twice as many rows as inputs, else as it is."""
    rows, width = target.weight_shape[0], math.prod(target.weight_shape[1:])
    if how == SWAPPED_IF_TWO_HALVES and rows != 2 * width:
        layout.register(target, names)
        return
    half = rows // 2
    layout.register_composite([(target.key, (half, rows)), (target.key, (0, half))], names)


def _set_transformer_blocks(layout: ModelLayout, family: TransformerFamily) -> None:
    """The layout's blocks: its text encoders', then the family's kinds in order, then OTHER."""
    present = {t.block for t in layout.targets.values()}
    layout.blocks = sorted(present | {"OTHER"}, key=_transformer_block_order(family))


def _transformer_block_order(family: TransformerFamily):
    groups = {group: n for n, group in enumerate(family.block_groups)}

    def order(block: str) -> tuple[int, int, int]:
        if block.startswith("TE"):
            return (0, 0, int(block[2:] or 0))
        match = re.fullmatch(r"([A-Z]+)(\d+)", block)
        if match and match.group(1) in groups:
            return (1, groups[match.group(1)], int(match.group(2)))
        return (2, 0, 0)

    return order


def _unet_names(path: str, sgm_path: str | None) -> list[str]:
    flat = _underscored(path)
    names = [f"lora_unet_{flat}", f"lycoris_{flat}", f"unet.{path}", f"base_model.model.{path}", path]
    if sgm_path:
        names += [f"lora_unet_{_underscored(sgm_path)}", f"diffusion_model.{sgm_path}"]
    return names


def _text_encoder_names(component: str, path: str, prefixes: tuple[str, ...]) -> list[str]:
    """transformers 5 dropped ``text_model.`` from CLIPTextModel; files still have it, so both. A
    language model's ``model.`` is left out of ComfyUI's names of it, so both too."""
    variants = [path]
    if path.startswith("text_model."):
        variants.append(path[len("text_model."):])
    elif path.startswith("model."):
        variants.append(path[len("model."):])
    else:
        variants.append("text_model." + path)
    names = []
    for variant in variants:
        names += [prefix + _underscored(variant) for prefix in prefixes]
        names += [f"{component}.{variant}"]
    names.append(f"base_model.model.{path}")
    return names


@dataclass
class UnetStructure:
    """How many resnets/attentions/samplers each UNet level has: all the SGM numbering needs."""

    down: list[tuple[int, int, bool]]  # per level: (resnets, attentions, has downsampler)
    mid: tuple[int, int]  # (resnets, attentions)
    up: list[tuple[int, int, bool]]  # per level: (resnets, attentions, has upsampler)

    @classmethod
    def from_diffusers(cls, unet: nn.Module) -> UnetStructure:
        def level(block: nn.Module, sampler: str) -> tuple[int, int, bool]:
            return (len(block.resnets), len(getattr(block, "attentions", None) or []),
                    bool(getattr(block, sampler, None)))

        mid = getattr(unet, "mid_block", None)
        return cls(
            down=[level(b, "downsamplers") for b in getattr(unet, "down_blocks", [])],
            mid=(len(mid.resnets), len(getattr(mid, "attentions", None) or [])) if mid is not None else (0, 0),
            up=[level(b, "upsamplers") for b in getattr(unet, "up_blocks", [])],
        )

    @classmethod
    def from_sgm_paths(cls, paths: Iterable[str]) -> UnetStructure:
        """Read the structure off SGM module paths (``input_blocks.4.1.proj_in``…), as ComfyUI has them."""
        slots: dict[tuple[str, int], dict[str, set[str]]] = {}
        middle: set[int] = set()
        for path in paths:
            parts = path.split(".")
            if parts[0] in ("input_blocks", "output_blocks") and len(parts) >= 4 and parts[1].isdigit():
                slots.setdefault((parts[0], int(parts[1])), {}).setdefault(parts[2], set()).add(parts[3])
            elif parts[0] == "middle_block" and len(parts) >= 2 and parts[1].isdigit():
                middle.add(int(parts[1]))

        def is_sampler(children: set[str]) -> bool:
            return children <= {"op", "conv"}

        down: list[tuple[int, int, bool]] = []
        resnets = attentions = 0
        for (side, n), content in sorted(slots.items()):
            if side != "input_blocks" or n == 0:
                continue
            if is_sampler(content.get("0", set())):
                down.append((resnets, attentions, True))
                resnets = attentions = 0
            else:
                resnets += 1
                attentions += "1" in content
        if resnets:
            down.append((resnets, attentions, False))
        up: list[tuple[int, int, bool]] = []
        resnets = attentions = 0
        for (side, _), content in sorted(slots.items()):
            if side != "output_blocks":
                continue
            resnets += 1
            attention = "1" in content and not is_sampler(content["1"])
            attentions += attention
            if any(slot != "0" and is_sampler(children) for slot, children in content.items()):
                up.append((resnets, attentions, True))
                resnets = attentions = 0
        if resnets:
            up.append((resnets, attentions, False))
        return cls(down=down, mid=((len(middle) + 1) // 2, len(middle) // 2), up=up)


class SgmNames:
    """diffusers UNet paths ↔ SGM/LDM paths (``input_blocks.N.i…``), from the UNet's structure.

    Counting resnets, attentions and samplers per level gives the index formulas of
    docs/names-and-blocks.md#index-formulas for any depth (SD1.5, SDXL, the refiner)."""

    def __init__(self, structure: UnetStructure | nn.Module):
        if not isinstance(structure, UnetStructure):
            structure = UnetStructure.from_diffusers(structure)
        self.prefixes: dict[str, str] = dict(TOP_LEVEL_TO_SGM)
        n = 1
        for i, (resnets, attentions, sampler) in enumerate(structure.down):
            for j in range(resnets):
                self.prefixes[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
                if j < attentions:
                    self.prefixes[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
                n += 1
            if sampler:
                self.prefixes[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
                n += 1
        resnets, attentions = structure.mid
        for j in range(resnets):
            self.prefixes[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
        for j in range(attentions):
            self.prefixes[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
        n = 0
        for i, (resnets, attentions, sampler) in enumerate(structure.up):
            for j in range(resnets):
                self.prefixes[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
                if j < attentions:
                    self.prefixes[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
                n += 1
            if sampler:
                slot = 2 if attentions else 1
                self.prefixes[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n - 1}.{slot}.conv"
        self.inverse = {sgm: diffusers for diffusers, sgm in self.prefixes.items()}

    def to_sgm(self, path: str) -> str | None:
        return self._convert(path, self.prefixes, RESNET_TO_SGM, ".resnets.")

    def to_diffusers(self, sgm_path: str) -> str | None:
        return self._convert(sgm_path, self.inverse, SGM_TO_RESNET, None)

    @staticmethod
    def _convert(path: str, prefixes: dict[str, str], inner: dict[str, str], marker: str | None) -> str | None:
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            mapped = prefixes.get(head)
            if mapped is None:
                continue
            rest = ".".join(parts[cut:])
            is_resnet = (f".{head}.".find(marker) >= 0) if marker else ".resnets." in f".{mapped}."
            if is_resnet and rest:
                for old, new in inner.items():
                    if rest == old or rest.startswith(old + "."):
                        rest = new + rest[len(old):]
                        break
            return f"{mapped}.{rest}" if rest else mapped
        return None


_SGM_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")


def block_of_sgm(sgm_path: str | None) -> str:
    """IN00…/M00/OUT00… from an SGM path; OTHER for time/label embeddings and the output head."""
    if sgm_path is None:
        return "OTHER"
    if sgm_path.startswith("middle_block."):
        return "M00"
    match = _SGM_BLOCK.match(sgm_path)
    if match:
        return ("IN" if match.group(1) == "input_blocks" else "OUT") + f"{int(match.group(2)):02d}"
    return "OTHER"


def _ordered_blocks(present: set[str], sgm: SgmNames | None) -> list[str]:
    def order(block: str) -> tuple[int, int]:
        if block.startswith("TE"):
            return (0, int(block[2:] or 0))
        if block.startswith("IN"):
            return (1, int(block[2:]))
        if block == "M00":
            return (2, 0)
        if block.startswith("OUT"):
            return (3, int(block[3:]))
        return (4, 0)

    blocks = set(present)
    if sgm is not None:
        # Every IN/OUT slot of the UNet exists as a block, even one this layout has no layer in.
        for sgm_path in sgm.prefixes.values():
            blocks.add(block_of_sgm(sgm_path + "."))
        blocks.add("OTHER")
    return sorted(blocks, key=order)


def detect_family(unet: nn.Module | None, text_encoder_2: nn.Module | None) -> str:
    """sdxl / sd1 / sd2 from the UNet config (``text_time`` embedding, cross-attention width)."""
    config = getattr(unet, "config", None)
    if config is not None:
        get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
        if get("addition_embed_type", None) == "text_time":
            return "sdxl"
        width = get("cross_attention_dim", None)
        if width == 768:
            return "sd1"
        if width == 1024:
            return "sd2"
    if text_encoder_2 is not None:
        return "sdxl"
    return "sd1" if unet is not None else "unknown"


_GUESS = [
    (re.compile(r"(?:^|_)te1_|^text_encoder\."), lambda match: "TE1"),
    (re.compile(r"(?:^|_)te2_|^text_encoder_2\."), lambda match: "TE2"),
    (re.compile(r"(?:^|_)te_"), lambda match: "TE"),
    (re.compile(r"input_blocks[._](\d+)"), lambda match: f"IN{int(match.group(1)):02d}"),
    (re.compile(r"output_blocks[._](\d+)"), lambda match: f"OUT{int(match.group(1)):02d}"),
    (re.compile(r"middle_block|mid_block"), lambda match: "M00"),
    (re.compile(r"down_blocks[._](\d+)[._](?:resnets|attentions)[._](\d+)"),
     lambda match: f"IN{1 + 3 * int(match.group(1)) + int(match.group(2)):02d}"),
    (re.compile(r"down_blocks[._](\d+)[._]downsamplers"), lambda match: f"IN{3 + 3 * int(match.group(1)):02d}"),
    (re.compile(r"up_blocks[._](\d+)[._](?:resnets|attentions)[._](\d+)"),
     lambda match: f"OUT{3 * int(match.group(1)) + int(match.group(2)):02d}"),
    (re.compile(r"up_blocks[._](\d+)[._]upsamplers"), lambda match: f"OUT{3 * int(match.group(1)) + 2:02d}"),
]


def guess_block(module_name: str) -> str:
    """Best-effort block of a name that did not resolve (for the report only); ``?`` if unknown."""
    for pattern, make in _GUESS:
        match = pattern.search(module_name)
        if match:
            return make(match)
    return "?"
