"""Start the real ComfyUI server (``main.py --cpu``) on loopback with our pack in ``custom_nodes``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from comfy_support import require_comfyui

REPO = Path(__file__).resolve().parent.parent
TEST_NODES = Path(__file__).resolve().parent / "comfy_test_nodes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, log: Path, process: subprocess.Popen):
        self.url, self.log, self.process = url, log, process

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def get_raw(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def post(self, path: str, payload: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise AssertionError(f"{path}: HTTP {err.code}: {err.read().decode()[:2000]}") from None

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": "lohakr-tests"})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; log: {self.log.read_text()[-3000:]}")


@contextlib.contextmanager
def comfy_server(base: Path, loras: Path, *, test_nodes: bool = True, timeout: float = 180, env: dict | None = None):
    """Yield a running server; our repo is linked into ``custom_nodes`` as a user would drop it."""
    comfy_dir = require_comfyui()
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    (custom_nodes / "lohakr-pack").symlink_to(REPO, target_is_directory=True)
    if test_nodes:
        (custom_nodes / "lohakr_test_nodes").symlink_to(TEST_NODES, target_is_directory=True)
    config = base / "extra_model_paths.yaml"
    config.write_text(f"lohakr_tests:\n    base_path: {base}\n    custom_nodes: custom_nodes\n    loras: {loras}\n")
    port = free_port()
    log = base / "comfyui.log"
    process = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--extra-model-paths-config", str(config), "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
         "--disable-auto-launch"],
        cwd=comfy_dir, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
    )
    server = Server(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"ComfyUI exited ({process.returncode}): {log.read_text()[-3000:]}")
            try:
                server.get("/object_info/LohakrLoader")
                break
            except (urllib.error.URLError, ConnectionError, OSError) as err:
                if time.time() > deadline:
                    raise AssertionError(f"ComfyUI did not start in {timeout} s: {log.read_text()[-3000:]}") from err
                time.sleep(0.5)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
