"""lohakr: exact LoHa/LoKr (LyCORIS) adapters for SDXL and SD1.5, in diffusers and ComfyUI.

Importing this package does no work and imports neither comfy nor diffusers.
"""

from .loaders import *  # noqa: F401,F403
from .loaders import __all__ as _loader_api

__version__ = "0.1.0"
__all__ = [*_loader_api, "__version__"]
