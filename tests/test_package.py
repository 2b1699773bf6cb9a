"""The package contract: importing does no work and pulls in neither comfy nor diffusers."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light_and_registers_classic_nodes_outside_comfyui():
    code = ("import sys, lohakr; "
            "heavy = [m for m in ('comfy', 'comfy_api', 'diffusers', 'transformers', 'folder_paths') "
            "if m in sys.modules]; "
            "print(heavy, sorted(lohakr.NODE_CLASS_MAPPINGS), lohakr.WEB_DIRECTORY)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    nodes = ["LohakrApplyStack", "LohakrInfo", "LohakrLoader", "LohakrLoaderModelOnly", "LohakrSaveLora",
             "LohakrStack"]
    assert out.startswith(f"[] {nodes}")
    assert "./web" in out


def test_a_built_wheel_carries_the_native_kernel_source_and_the_web_files(tmp_path):
    """``pip install lohakr`` (not editable) must ship ``native/kernels.c``, or the native kernels
    could never be built there."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lohakr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"lohakr/loaders/native/__init__.py", "lohakr/loaders/native/kernels.c", "lohakr/web/lohakr.js",
            "lohakr/loaders/layouts/sdxl.json", "lohakr/loaders/layouts/sd1.json"} <= names
