"""Read-only HTTP route for the web card: ``GET /lohakr/info?name=<file in loras>``.

Only names that ComfyUI lists in its ``loras`` folders are served: absolute paths, ``..`` and
anything outside those folders are refused with 400/404 before any file is opened.
"""

from __future__ import annotations

import asyncio
import os
import sys

from ..loaders.adapter import adapter_cache
from ..loaders.describe import describe_adapter
from ..loaders.errors import LohakrError


class BadNameError(ValueError):
    """The requested name is not a plain relative path."""


def checked_lora_path(name: str, listed: list[str], resolve_full) -> str:
    """The full path of ``name`` if it is one of ``listed`` (ComfyUI's loras listing).

    Raises ``BadNameError`` for absolute or parent-relative names, ``LookupError`` for unknown ones."""
    if not name or "\x00" in name:
        raise BadNameError("name is empty")
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise BadNameError("absolute paths are not allowed")
    if any(part == ".." for part in normalised.split("/")):
        raise BadNameError("'..' is not allowed")
    if name not in listed:
        raise LookupError(f"{name} is not in the loras folder(s)")
    path = resolve_full(name)
    if path is None:
        raise LookupError(f"{name} is not in the loras folder(s)")
    return path


def register_routes() -> bool:
    """Add the route when running inside ComfyUI's server; a no-op elsewhere (imports nothing)."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or "folder_paths" not in sys.modules:
        return False
    import folder_paths
    from aiohttp import web

    @instance.routes.get("/lohakr/info")
    async def lohakr_info(request):
        name = request.query.get("name", "")
        try:
            path = checked_lora_path(name, folder_paths.get_filename_list("loras"),
                                     lambda n: folder_paths.get_full_path("loras", n))
        except BadNameError as err:
            return web.json_response({"error": str(err)}, status=400)
        except LookupError as err:
            return web.json_response({"error": str(err)}, status=404)
        try:
            adapter = await asyncio.to_thread(adapter_cache.load, path)
        except LohakrError as err:
            return web.json_response({"error": str(err)}, status=422)
        return web.json_response(describe_adapter(adapter))

    return True
