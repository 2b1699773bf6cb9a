"""The node declarations as classic ComfyUI nodes (``INPUT_TYPES`` / ``NODE_CLASS_MAPPINGS``)."""

from __future__ import annotations

from typing import Any

from .definitions import CATEGORY, NODES, NodeSpec, Param, fingerprint, lora_names


def _input(param: Param) -> tuple:
    options: dict[str, Any] = {"tooltip": param.tooltip}
    if param.kind == "LORA_FILE":
        names = lora_names()
        if param.default == "None":
            names = ["None", *names]
        return (names, options)
    if param.kind == "FLOAT":
        options.update(default=param.default, min=param.minimum, max=param.maximum, step=param.step)
        return ("FLOAT", options)
    if param.kind == "STRING":
        options.update(default=param.default or "", multiline=param.multiline)
        return ("STRING", options)
    if param.kind == "BOOLEAN":
        options.update(default=bool(param.default))
        return ("BOOLEAN", options)
    return (param.kind, options)


def build(spec: NodeSpec) -> type:
    def input_types(cls) -> dict:
        required = {p.name: _input(p) for p in spec.inputs if not p.optional}
        optional = {p.name: _input(p) for p in spec.inputs if p.optional}
        return {"required": required, "optional": optional}

    def run(self, **kwargs):
        result, ui = spec.run(**kwargs)
        return {"ui": ui, "result": result} if ui else result

    def is_changed(cls, **kwargs):
        return fingerprint(**kwargs)

    attributes = {
        "INPUT_TYPES": classmethod(input_types),
        "RETURN_TYPES": tuple(t for t, _, _ in spec.outputs),
        "RETURN_NAMES": tuple(n for _, n, _ in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(tip for _, _, tip in spec.outputs),
        "FUNCTION": "run",
        "CATEGORY": CATEGORY,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "run": run,
    }
    if spec.file_inputs:
        attributes["IS_CHANGED"] = classmethod(is_changed)
    return type(spec.node_id, (), attributes)


NODE_CLASS_MAPPINGS = {spec.node_id: build(spec) for spec in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {spec.node_id: spec.display_name for spec in NODES}
