"""The web extension in a real browser: real ComfyUI (``COMFYUI_DIR``) with its real frontend,
headless Chromium driven by playwright-core. Screenshots land in ``$LOHAKR_ARTIFACTS/<view>``
(default: the test's tmp dir).

Three views:

* ``pinned``: the frontend ComfyUI ships (its ``comfyui-frontend-package`` requirement), canvas renderer;
* ``newest``: the newest ``comfyui-frontend-package`` (``LOHAKR_NEW_FRONTEND_ROOT`` = its ``static``
  folder, served with ``--front-end-root``), canvas renderer;
* ``newest-vue``: the same frontend with its Vue "Nodes 2.0" renderer (``Comfy.VueNodes.Enabled``).

Every panel (card, block-weight editor open / invalid / collapsed, stack rows, report) gets a layout
check in every view: content inside the node, no scroll in any direction, the panel no taller than
its content plus padding, status lines visible.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from comfy_support import import_comfy, require_comfyui

require_comfyui()

import comfy_server as comfy_server_module  # noqa: E402
from comfy_server import comfy_server  # noqa: E402

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NEW_FRONTEND = os.environ.get("LOHAKR_NEW_FRONTEND_ROOT", "")
VIEWS = {"pinned": (None, "canvas"), "newest": (NEW_FRONTEND, "canvas"), "newest-vue": (NEW_FRONTEND, "vue")}


def require_browser():
    if not shutil.which("node"):
        pytest.skip("node is not installed: the browser test drives Chromium with playwright-core (npm)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.skip("playwright-core is not installed: run 'npm install' in tests/browser")


@contextlib.contextmanager
def server_with_frontend(base: Path, loras: Path, front_end_root: str | None):
    """comfy_server, with ``--front-end-root`` added to ComfyUI's command line when one is given."""
    if not front_end_root:
        with comfy_server(base, loras) as server:
            yield server
        return
    real_popen = subprocess.Popen

    def popen(args, *rest, **kwargs):
        if isinstance(args, list) and "main.py" in args:
            args = [*args, "--front-end-root", front_end_root]
        return real_popen(args, *rest, **kwargs)

    with contextlib.ExitStack() as stack:
        with mock.patch.object(comfy_server_module.subprocess, "Popen", popen):
            server = stack.enter_context(comfy_server(base, loras))
        yield server


def pinned_frontend_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("comfyui-frontend-package")
    except Exception:  # noqa: BLE001 - informative only
        return None


@pytest.mark.parametrize("view", list(VIEWS))
def test_extension_in_real_browser(tmp_path, view):
    front_end_root, renderer = VIEWS[view]
    if view != "pinned":
        if not NEW_FRONTEND:
            pytest.skip("set LOHAKR_NEW_FRONTEND_ROOT to the static/ folder of the newest comfyui-frontend-package "
                        "(pip download --no-deps comfyui-frontend-package; unzip the wheel)")
        if not (Path(NEW_FRONTEND) / "index.html").is_file():
            pytest.skip(f"LOHAKR_NEW_FRONTEND_ROOT={NEW_FRONTEND} has no index.html")
    require_browser()
    import_comfy()
    from test_comfyui_nodes import make_file

    loras = tmp_path / "loras"
    loras.mkdir()
    make_file(loras, "loha_tucker", "browser_loha")
    artifacts = Path(os.environ.get("LOHAKR_ARTIFACTS", tmp_path / "screenshots")) / view
    with server_with_frontend(tmp_path / "comfy", loras, front_end_root) as server:
        status, body = server.get_raw("/lohakr/info?name=browser_loha.safetensors")
        assert status == 200 and json.loads(body)["algorithms"] == {"LoHa": json.loads(body)["modules"]}
        for bad in ("../browser_loha.safetensors", "/etc/passwd", "..%2Fbrowser_loha.safetensors"):
            status, _ = server.get_raw(f"/lohakr/info?name={bad}")
            assert 400 <= status < 500, (bad, status)
        assert server.get_raw("/lohakr/info?name=nothere.safetensors")[0] == 404
        status, script = server.get_raw("/extensions/lohakr-pack/lohakr.js")
        assert status == 200 and b"registerExtension" in script
        command = ["node", str(BROWSER_DIR / "drive.mjs"), server.url, str(artifacts), "browser_loha.safetensors",
                   renderer]
        run = subprocess.run(command, capture_output=True, text=True, timeout=400,
                             env={**os.environ, "CHROMIUM": CHROMIUM})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    (artifacts / "result.json").write_text(json.dumps(result, indent=1))
    assert "error" not in result, result.get("error")
    if view == "pinned" and pinned_frontend_version():
        assert result["frontendVersion"] == pinned_frontend_version()
    elif view != "pinned":
        assert result["frontendVersion"] and result["frontendVersion"] != pinned_frontend_version()
    steps = result["steps"]
    assert steps["extensionLoaded"] and steps["nodesAdded"]
    assert steps["vueNodes"] is (renderer == "vue")
    assert result["ourErrors"] == [], result["ourErrors"]
    assert "LoHa" in steps["cardText"] and "Tucker" in steps["cardText"] and "SDXL" in steps["cardText"]
    editor = steps["editor"]
    assert editor["afterSlider"] == "IN04=0.5" and editor["redrawnOnSlider"]
    assert editor["typedKept"] == "OUTALL, IN08=0.5" and editor["in08"] == "0.5" and editor["in00"] == "0"
    assert editor["invalid"] == {"value": "IN99=1", "valid": "false", "status": True}
    # Panels shrink as well as grow: opening the editor makes the node taller, collapsing it shrinks it back.
    heights = steps["editorHeights"]
    assert heights["openHeight"] > heights["collapsedHeight"] + 100, heights
    assert heights["collapsedHeight"] <= heights["closedHeight"] + 20, heights

    # Layout check per panel and view (see layoutCheck in drive.mjs).
    layout = result["layout"]
    expected = {"card", "editor-closed", "editor-invalid", "editor-open", "editor-collapsed", "stack-row-editor",
                "stack-3-rows", "reloaded-card", "reloaded-stack", "report", "report-card", "report-60"}
    assert expected <= set(layout), sorted(expected - set(layout))
    problems = {name: check["problems"] for name, check in layout.items() if check["problems"]}
    assert problems == {}, problems
    assert any("invalid block weights" in s["text"] and s["visible"] for s in layout["editor-invalid"]["statuses"])
    assert any(s["text"].startswith("block weights:") and s["visible"] for s in layout["editor-open"]["statuses"])
    assert any("applied on sdxl" in s["text"] and s["visible"] for s in layout["report"]["statuses"])

    # The stack: one line per row; context menu moves and removes; the drag handle reorders; the chip edits.
    stack = steps["stack"]
    assert stack["beforeMove"] == [[True, 0.25, 1], [False, 1, 1], [True, 1, 0.5]]
    assert stack["afterMenu"] == [[False, 1, 1], [True, 0.25, 1], [True, 1, 0.5]]
    assert stack["afterDrag"] == [0.5, 1, 1] and stack["afterDragBack"] == [1, 1, 0.5]
    assert stack["chip"] == "IN04=0, OUT01=0.5" and stack["chipText"].startswith("IN04=0")
    assert all(h <= 28 for h in stack["rowHeights"]), stack["rowHeights"]
    rows = steps["rows"]
    assert len(rows) == 2 and rows[0]["enabled"] is False and rows[1]["strength_model"] == 0.25
    reload = steps["reload"]
    assert reload["blockWeights"] == "IN04=0.5" and reload["slider"] == "0.5"
    assert reload["rows"] == rows and reload["renderedRows"] == 2

    report = steps["report"]
    assert "applied on sdxl" in report["text"]
    assert any(cell.startswith("IN04:") and "partial" not in cell for cell in report["cells"])
    assert any("TE1:" in cell for cell in report["cells"])
    # The strip's labels read without hovering, at 100 % and at 60 % zoom.
    labels = [c["text"] for c in steps["strip100"]]
    assert {"IN", "OUT", "M", "TE"} <= set(labels) and "OU" not in labels
    for zoom in ("strip100", "strip60"):
        bad = [c for c in steps[zoom] if not c["fits"] or (c["text"] and c["screenPx"] < 7)]
        assert bad == [], (zoom, bad)
    for name in ("1-card", "2-editor", "2-editor-invalid", "3-stack", "3-stack-row-editor", "3-reloaded",
                 "4-report", "5-report-60"):
        assert (artifacts / f"{name}.png").stat().st_size > 1000
