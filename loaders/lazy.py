"""Modules imported on first use.

Describing a file (``python -m lohakr info``, the web card) needs neither torch nor the math built
on it, and importing torch alone takes over a second; so the modules that describe import those
through ``lazy_module`` and pay for them only when a tensor is actually built.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class _LazyModule:
    def __init__(self, name: str, package: str | None) -> None:
        self._name, self._package = name, package
        self._module: ModuleType | None = None

    def __getattr__(self, attribute: str):
        if self._module is None:
            self._module = importlib.import_module(self._name, self._package)
        return getattr(self._module, attribute)


def lazy_module(name: str, package: str | None = None) -> ModuleType:
    """``name`` (relative to ``package``), imported the first time an attribute is read."""
    return _LazyModule(name, package)  # type: ignore[return-value]
