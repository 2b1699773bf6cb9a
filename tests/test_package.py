"""The package contract: importing does no work and pulls in neither comfy nor diffusers."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_registers_classic_nodes_outside_comfyui():
    code = ("import sys, lohakr; "
            "heavy = [m for m in ('comfy', 'comfy_api', 'diffusers', 'transformers', 'folder_paths') if m in sys.modules]; "
            "print(heavy, sorted(lohakr.NODE_CLASS_MAPPINGS), lohakr.WEB_DIRECTORY)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] ['LohakrApplyStack', 'LohakrInfo', 'LohakrLoader', 'LohakrLoaderModelOnly', 'LohakrStack']")
    assert "./web" in out
