"""The web extension in a real browser: real ComfyUI (``COMFYUI_DIR``) with its real frontend,
headless Chromium driven by playwright-core. Screenshots land in ``$LOHAKR_ARTIFACTS`` (default:
the test's tmp dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from comfy_support import import_comfy, require_comfyui

require_comfyui()

from comfy_server import comfy_server  # noqa: E402

BROWSER_DIR = Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def require_browser():
    if not shutil.which("node"):
        pytest.skip("node is not installed: the browser test drives Chromium with playwright-core (npm)")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        pytest.skip("playwright-core is not installed: run 'npm install' in tests/browser")


def test_extension_in_real_browser(tmp_path):
    require_browser()
    import_comfy()
    from test_comfyui_nodes import make_file

    loras = tmp_path / "loras"
    loras.mkdir()
    make_file(loras, "loha_tucker", "browser_loha")
    artifacts = Path(os.environ.get("LOHAKR_ARTIFACTS", tmp_path / "screenshots"))
    with comfy_server(tmp_path / "comfy", loras) as server:
        status, body = server.get_raw("/lohakr/info?name=browser_loha.safetensors")
        assert status == 200 and json.loads(body)["algorithms"] == {"LoHa": json.loads(body)["modules"]}
        for bad in ("../browser_loha.safetensors", "/etc/passwd", "..%2Fbrowser_loha.safetensors"):
            status, _ = server.get_raw(f"/lohakr/info?name={bad}")
            assert 400 <= status < 500, (bad, status)
        assert server.get_raw("/lohakr/info?name=nothere.safetensors")[0] == 404
        status, script = server.get_raw("/extensions/lohakr-pack/lohakr.js")
        assert status == 200 and b"registerExtension" in script
        command = ["node", str(BROWSER_DIR / "drive.mjs"), server.url, str(artifacts), "browser_loha.safetensors"]
        run = subprocess.run(command,
                             capture_output=True, text=True, timeout=400, env={**os.environ, "CHROMIUM": CHROMIUM})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "error" not in result, result.get("error")
    steps = result["steps"]
    assert steps["extensionLoaded"] and steps["nodesAdded"]
    assert result["ourErrors"] == [], result["ourErrors"]
    assert "LoHa" in steps["cardText"] and "Tucker" in steps["cardText"] and "SDXL" in steps["cardText"]
    editor = steps["editor"]
    assert editor["afterSlider"] == "IN04=0.5"
    assert editor["typedKept"] == "OUTALL, IN08=0.5" and editor["in08"] == "0.5" and editor["in00"] == "0"
    assert editor["invalid"] == {"value": "IN99=1", "valid": "false", "status": True}
    rows = steps["rows"]
    assert len(rows) == 2 and rows[0]["enabled"] is False and rows[1]["strength_model"] == 0.25
    reload = steps["reload"]
    assert reload["blockWeights"] == "IN04=0.5" and reload["slider"] == "0.5"
    assert reload["rows"] == rows and reload["renderedRows"] == 2
    report = steps["report"]
    assert "applied on sdxl" in report["text"]
    assert any(cell.startswith("IN04:") and "partial" not in cell for cell in report["cells"])
    assert any("TE1:" in cell for cell in report["cells"])
    for name in ("1-card", "2-editor", "3-reloaded", "4-report"):
        assert (artifacts / f"{name}.png").stat().st_size > 1000
