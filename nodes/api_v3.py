"""The node declarations as ComfyUI's current node API (``comfy_api.latest``, ``comfy_entrypoint``)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .definitions import CATEGORY, NODES, NodeSpec, Param, fingerprint, lora_names

_STACK = io.Custom("LORA_STACK")
_TYPES = {"MODEL": io.Model, "CLIP": io.Clip, "LORA_STACK": _STACK, "STRING": io.String}


def _input(param: Param):
    common = dict(optional=param.optional, tooltip=param.tooltip)
    if param.kind == "LORA_FILE":
        names = lora_names()
        if param.default == "None":
            names = ["None", *names]
        return io.Combo.Input(param.name, options=names, **common)
    if param.kind == "FLOAT":
        return io.Float.Input(param.name, default=param.default, min=param.minimum, max=param.maximum,
                              step=param.step, **common)
    if param.kind == "STRING":
        return io.String.Input(param.name, default=param.default or "", multiline=param.multiline, **common)
    if param.kind == "BOOLEAN":
        return io.Boolean.Input(param.name, default=bool(param.default), **common)
    return _TYPES[param.kind].Input(param.name, **common)


def build(spec: NodeSpec) -> type:
    def define_schema(cls):
        return io.Schema(
            node_id=spec.node_id,
            display_name=spec.display_name,
            category=CATEGORY,
            description=spec.description,
            inputs=[_input(p) for p in spec.inputs],
            outputs=[(_TYPES.get(t) or io.String).Output(display_name=n, tooltip=tip) for t, n, tip in spec.outputs],
            is_output_node=spec.output_node,
        )

    def execute(cls, **kwargs):
        result, ui = spec.run(**kwargs)
        return io.NodeOutput(*result, ui=ui)

    def fingerprint_inputs(cls, **kwargs):
        return fingerprint(**kwargs)

    attributes = {"define_schema": classmethod(define_schema), "execute": classmethod(execute)}
    if spec.file_inputs:
        attributes["fingerprint_inputs"] = classmethod(fingerprint_inputs)
    return type(spec.node_id, (io.ComfyNode,), attributes)


NODE_CLASSES = [build(spec) for spec in NODES]


class LohakrExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> LohakrExtension:
    return LohakrExtension()
