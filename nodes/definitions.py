"""The nodes, declared once: inputs, outputs, tooltips and a thin ``run`` that calls the bridge.

``api_v3.py`` and ``api_classic.py`` turn these declarations into ComfyUI node classes; only
one of them is registered, depending on what the running ComfyUI supports. Node ids are API.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..loaders.adapter import adapter_cache
from ..loaders.describe import describe_adapter, describe_coverage, format_coverage, format_description
from ..loaders.errors import LohakrError
from ..loaders.lazy import lazy_module
from ..loaders.safe_json import parse_json

bridge = lazy_module(".comfy_bridge", __package__)  # torch and comfy: imported when a node runs

CATEGORY = "loaders/lohakr"
STRENGTH = dict(default=1.0, minimum=-100.0, maximum=100.0, step=0.01)
BLOCK_WEIGHTS_TIP = ("Per-block strengths. Empty = all 1. An A1111 lora-block-weight vector (12 or 20 values "
                     "for SDXL, 17 or 26 for SD1.5; for transformers BASE then every block), a preset (ALL, NONE, "
                     "INALL, MIDALL, OUTALL, INS, IND, MIDD, OUTD, OUTS) or named values such as "
                     "'IN04=0.5, OUT=0, TE2=0' or 'DOUBLE=0.5, SINGLE03=0'.")
LORA_TIP = "A LoHa/LoKr (or any LyCORIS) .safetensors file from your loras folder."
BASE_MISMATCH_TIP = ("Apply the adapter even though it says it was trained for another base model (header, key "
                     "names or shapes), patching only the layers that fit. Off: such a file is refused.")


@dataclass
class Param:
    name: str
    kind: str  # MODEL, CLIP, LORA_STACK, LORA_FILE, FLOAT, STRING, BOOLEAN
    tooltip: str
    optional: bool = False
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    multiline: bool = False


@dataclass
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: list[Param]
    outputs: list[tuple[str, str, str]]  # (type, name, tooltip)
    run: Callable[..., tuple[tuple, dict | None]]
    output_node: bool = False
    file_inputs: tuple[str, ...] = field(default=("lora_name",))


# -- helpers ---------------------------------------------------------------------------------------
def lora_names() -> list[str]:
    import folder_paths

    return folder_paths.get_filename_list("loras")


def lora_path(name: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras"))
        raise LohakrError(f"{name}: not found in the loras folder(s) {folders}")
    return path


def fingerprint(**inputs: Any) -> str:
    """Changes when a chosen file changes on disk, so ComfyUI re-runs the node."""
    name = inputs.get("lora_name")
    if not name:
        return ""
    try:
        stat = os.stat(lora_path(name))
    except (OSError, LohakrError):
        return f"{name}:missing"
    return f"{name}:{stat.st_size}:{stat.st_mtime_ns}"


def report_ui(reports) -> dict:
    return {
        "text": ["\n\n".join(r.format(names=10) for r in reports) or "nothing applied (strength 0)"],
        "lohakr_report": [json.dumps([r.to_dict() for r in reports], default=str)],
    }


class StackEntry(tuple):
    """A LORA_STACK entry ``(name, strength_model, strength_clip)`` that carries our block weights
    alongside: it unpacks as the 3-tuple other packs expect."""

    block_weights: str = ""

    def __new__(cls, name: str, strength_model: float, strength_clip: float, block_weights: str = ""):
        entry = super().__new__(cls, (name, float(strength_model), float(strength_clip)))
        entry.block_weights = block_weights or ""
        return entry


def stack_items(stack) -> list:
    items = []
    for entry in stack or []:
        if len(entry) < 3:
            raise LohakrError(f"LORA_STACK entry {entry!r} is not (name, strength_model, strength_clip)")
        name, strength_model, strength_clip = entry[0], float(entry[1]), float(entry[2])
        if name in (None, "", "None"):
            continue
        items.append(bridge.StackItem(lora_path(name), strength_model, strength_clip,
                               getattr(entry, "block_weights", "") or None,
                               name=os.path.splitext(os.path.basename(name))[0]))
    return items


def parse_rows(rows: str) -> list[StackEntry]:
    """The stack node's rows: JSON ``[{"name", "strength_model", "strength_clip", "block_weights",
    "enabled"}, …]`` (what the web editor writes)."""
    if not rows or not rows.strip():
        return []
    data = parse_json(rows, "the stack node", "rows")
    if not isinstance(data, list):
        raise LohakrError("stack rows must be a JSON list of "
                          "{name, strength_model, strength_clip, block_weights, enabled}")
    entries = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not row.get("name"):
            raise LohakrError(f"stack row {i + 1} has no adapter name")
        if row.get("enabled", True) is False:
            continue
        entries.append(StackEntry(row["name"], row.get("strength_model", 1.0), row.get("strength_clip", 1.0),
                                  row.get("block_weights", "")))
    return entries


# -- node bodies ---------------------------------------------------------------------------------
def run_loader(model, lora_name, strength_model, block_weights="", clip=None, strength_clip=0.0,
               allow_base_mismatch=False):
    item = bridge.StackItem(lora_path(lora_name), strength_model, strength_clip, block_weights or None,
                     name=os.path.splitext(os.path.basename(lora_name))[0])
    new_model, new_clip, reports = bridge.apply_stack(model, clip, [item],
                                                      allow_base_mismatch=bool(allow_base_mismatch))
    return (new_model, new_clip), report_ui(reports)


def run_loader_model_only(model, lora_name, strength_model, block_weights="", allow_base_mismatch=False):
    (new_model, _), ui = run_loader(model, lora_name, strength_model, block_weights,
                                    allow_base_mismatch=allow_base_mismatch)
    return (new_model,), ui


def run_stack(lora_name="None", strength_model=1.0, strength_clip=1.0, block_weights="", rows="", lora_stack=None):
    stack = list(lora_stack or [])
    if lora_name and lora_name != "None":
        stack.append(StackEntry(lora_name, strength_model, strength_clip, block_weights))
    stack.extend(parse_rows(rows))
    for entry in stack:
        if entry[0] not in (None, "", "None"):
            lora_path(entry[0])  # fail here, on the node that names a missing file
    return (stack,), {"text": [f"{len(stack)} adapter(s): " + ", ".join(str(e[0]) for e in stack)]}


def run_apply_stack(model, lora_stack, clip=None, allow_base_mismatch=False):
    new_model, new_clip, reports = bridge.apply_stack(model, clip, stack_items(lora_stack),
                                               allow_base_mismatch=bool(allow_base_mismatch))
    return (new_model, new_clip), report_ui(reports)


def run_save_lora(model, lora_stack, filename, rank="exact", max_error=0.0, dtype="fp16", clip=None):
    from ..loaders.convert import format_conversion

    rank_value = rank.strip().lower() or "exact"
    if rank_value != "exact":
        try:
            rank_value = int(rank_value)
        except ValueError:
            raise LohakrError(f"rank {rank!r}: give 'exact' or a positive integer") from None
    if dtype not in ("fp16", "bf16", "fp32"):
        raise LohakrError(f"dtype {dtype!r}: choose fp16, bf16 or fp32")
    output = save_path(filename)
    conversion = bridge.save_stack_as_lora(model, clip, stack_items(lora_stack), output, rank_value,
                                           max_error or None, dtype)
    report = format_conversion(conversion)
    text = f"saved {os.path.basename(output)} in {os.path.dirname(output)}\n{report}"
    saved = json.dumps({"file": os.path.relpath(output, loras_root()), "report": report})
    return (text,), {"text": [text], "lohakr_saved": [saved]}


def loras_root() -> str:
    import folder_paths

    return os.path.realpath(folder_paths.get_folder_paths("loras")[0])


def save_path(filename: str) -> str:
    """A new file in the first loras folder: ``<filename>.safetensors``, or with ``_2``, ``_3``… when
    that exists (nothing is overwritten). Subfolders are allowed; leaving the folder is not."""
    root = loras_root()
    stem = (filename or "").strip().removesuffix(".safetensors") or "lohakr_merged"
    base = os.path.realpath(os.path.join(root, stem))
    if os.path.commonpath([root, base]) != root:
        raise LohakrError(f"{filename}: the file must stay inside the loras folder {root}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    path, number = base + ".safetensors", 1
    while os.path.exists(path):
        number += 1
        path = f"{base}_{number}.safetensors"
    return path


def run_info(lora_name, model=None, clip=None):
    adapter = adapter_cache.load(lora_path(lora_name))
    description = describe_adapter(adapter)
    text = format_description(description)
    coverage = None
    if model is not None or clip is not None:
        coverage = describe_coverage(adapter, bridge.comfy_layout(model, clip))
        text += "\n\n" + format_coverage(coverage)
    payload = json.dumps({"adapter": description, "coverage": coverage}, default=str)
    return (text,), {"text": [text], "lohakr_info": [payload]}


NODES: list[NodeSpec] = [
    NodeSpec(
        "LohakrLoader", "Load LoHa / LoKr (lohakr)",
        "Apply a LoHa/LoKr/LyCORIS adapter to MODEL and CLIP, exactly, with per-block strengths. "
        "Shows what applied, per block.",
        [Param("model", "MODEL", "The diffusion model to patch."),
         Param("lora_name", "LORA_FILE", LORA_TIP),
         Param("strength_model", "FLOAT", "Strength on the diffusion model (negative inverts).", **STRENGTH),
         Param("strength_clip", "FLOAT", "Strength on the text encoder(s) (negative inverts).", **STRENGTH),
         Param("block_weights", "STRING", BLOCK_WEIGHTS_TIP, default=""),
         Param("clip", "CLIP", "The text encoder(s) to patch (optional).", optional=True),
         Param("allow_base_mismatch", "BOOLEAN", BASE_MISMATCH_TIP, optional=True, default=False)],
        [("MODEL", "MODEL", "The patched model."), ("CLIP", "CLIP", "The patched text encoder(s).")],
        run_loader,
    ),
    NodeSpec(
        "LohakrLoaderModelOnly", "Load LoHa / LoKr, model only (lohakr)",
        "Apply a LoHa/LoKr/LyCORIS adapter to the diffusion model only.",
        [Param("model", "MODEL", "The diffusion model to patch."),
         Param("lora_name", "LORA_FILE", LORA_TIP),
         Param("strength_model", "FLOAT", "Strength on the diffusion model (negative inverts).", **STRENGTH),
         Param("block_weights", "STRING", BLOCK_WEIGHTS_TIP, default=""),
         Param("allow_base_mismatch", "BOOLEAN", BASE_MISMATCH_TIP, optional=True, default=False)],
        [("MODEL", "MODEL", "The patched model.")],
        run_loader_model_only,
    ),
    NodeSpec(
        "LohakrStack", "LoHa / LoKr stack (lohakr)",
        "Build a LORA_STACK of adapters (chainable; works with other packs' stacks). Apply it with "
        "'Apply LoHa / LoKr stack'.",
        [Param("lora_name", "LORA_FILE", LORA_TIP + " 'None' adds nothing.", default="None"),
         Param("strength_model", "FLOAT", "Strength on the diffusion model.", **STRENGTH),
         Param("strength_clip", "FLOAT", "Strength on the text encoder(s).", **STRENGTH),
         Param("block_weights", "STRING", BLOCK_WEIGHTS_TIP, default=""),
         Param("rows", "STRING", "More adapters, as JSON rows written by the stack editor: "
               "[{name, strength_model, strength_clip, block_weights, enabled}].", default="", multiline=True),
         Param("lora_stack", "LORA_STACK", "A stack to extend (from this or another pack).", optional=True)],
        [("LORA_STACK", "LORA_STACK", "The stack: (name, strength_model, strength_clip) entries.")],
        run_stack,
    ),
    NodeSpec(
        "LohakrApplyStack", "Apply LoHa / LoKr stack (lohakr)",
        "Apply a whole LORA_STACK (ours or another pack's) in one clone of MODEL and CLIP.",
        [Param("model", "MODEL", "The diffusion model to patch."),
         Param("lora_stack", "LORA_STACK", "The adapters to apply, in order."),
         Param("clip", "CLIP", "The text encoder(s) to patch (optional).", optional=True),
         Param("allow_base_mismatch", "BOOLEAN", BASE_MISMATCH_TIP, optional=True, default=False)],
        [("MODEL", "MODEL", "The patched model."), ("CLIP", "CLIP", "The patched text encoder(s).")],
        run_apply_stack, file_inputs=(),
    ),
    NodeSpec(
        "LohakrSaveLora", "Save stack as LoRA (lohakr)",
        "Write a LORA_STACK (LoHa, LoKr and LoRA files at their strengths and block weights) as one LoRA file in "
        "your loras folder: exact where the ranks allow, else SVD at a rank or error; reports each module's method, "
        "rank and error. Load it at strength 1 for the stack.",
        [Param("model", "MODEL", "The model the stack is for: its layers name the LoRA's modules."),
         Param("lora_stack", "LORA_STACK", "The adapters to save as one, in order."),
         Param("filename", "STRING", "File name in the loras folder, without .safetensors (subfolders allowed; "
               "an existing file is never overwritten: _2, _3… are added).", default="lohakr/merged"),
         Param("rank", "STRING", "'exact' (every module exactly, at the summed rank) or the largest rank to "
               "store; a module whose exact rank is larger gets a truncated SVD.", default="exact"),
         Param("max_error", "FLOAT", "With SVD: the smallest rank whose relative Frobenius error is at most this "
               "(0 = off: use the rank).", default=0.0, minimum=0.0, maximum=0.5, step=0.001),
         Param("dtype", "STRING", "Stored dtype: fp16, bf16 or fp32.", default="fp16"),
         Param("clip", "CLIP", "The text encoder(s), to save their modules too (optional).", optional=True)],
        [("STRING", "report", "What was written: per module the method, rank and error.")],
        run_save_lora, output_node=True, file_inputs=(),
    ),
    NodeSpec(
        "LohakrInfo", "LoHa / LoKr info (lohakr)",
        "What an adapter file is (algorithms, ranks, alphas, scales, Tucker, DoRA, base model, trigger tags) "
        "and, given a model, how it maps onto it block by block. Patches nothing.",
        [Param("lora_name", "LORA_FILE", LORA_TIP),
         Param("model", "MODEL", "Show coverage on this model (optional).", optional=True),
         Param("clip", "CLIP", "Show coverage on these text encoders (optional).", optional=True)],
        [("STRING", "info", "The description as text.")],
        run_info, output_node=True,
    ),
]
