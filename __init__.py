"""lohakr: exact LoHa/LoKr (LyCORIS) adapters for SDXL and SD1.5, in diffusers and ComfyUI.

As a Python package: ``lohakr.load_adapter``, ``lohakr.enable(pipe)`` and the rest of ``loaders``.
As a ComfyUI custom node pack (this folder in ``custom_nodes/``): the nodes of ``nodes/`` and the
frontend in ``web/``. Importing does no work and imports neither comfy nor diffusers.
"""

from typing import Any

from .loaders import __all__ as _loader_api
from .nodes import registration as _registration

__version__ = "0.1.0"
WEB_DIRECTORY = "./web"

globals().update(_registration())
__all__ = [*_loader_api, "__version__", "WEB_DIRECTORY"]


def __getattr__(name: str) -> Any:
    """The loader's public names (``lohakr.enable``, ``lohakr.load_adapter``…), imported on first use."""
    if name in _loader_api:
        from . import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
