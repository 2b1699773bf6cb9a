"""ComfyUI node pack. ``registration()`` picks ComfyUI's current node API when the running ComfyUI
has it (``comfy_api.latest``), the classic ``NODE_CLASS_MAPPINGS`` otherwise; never both."""

from __future__ import annotations

import importlib.util
import os


def current_api_available() -> bool:
    """True inside a ComfyUI whose ``comfy_api.latest`` exists (``LOHAKR_COMFY_API=classic`` forces
    the classic API). Outside ComfyUI nothing is imported."""
    if os.environ.get("LOHAKR_COMFY_API", "").lower() == "classic":
        return False
    try:
        find = importlib.util.find_spec
        return find("comfy_api") is not None and find("comfy_api.latest") is not None
    except (ImportError, ValueError):
        return False


def registration() -> dict:
    """The names ComfyUI looks for in a custom node package (and our HTTP route, inside ComfyUI)."""
    from .routes import register_routes

    register_routes()
    if current_api_available():
        from .api_v3 import comfy_entrypoint

        return {"comfy_entrypoint": comfy_entrypoint}
    from .api_classic import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return {"NODE_CLASS_MAPPINGS": NODE_CLASS_MAPPINGS, "NODE_DISPLAY_NAME_MAPPINGS": NODE_DISPLAY_NAME_MAPPINGS}
