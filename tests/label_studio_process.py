"""Run a real Label Studio and ``sam-mlx label-studio`` as subprocesses, connect them, decode what Label Studio
returns with its own converter: shared by ``test_label_studio_real.py`` and ``scripts/label_studio_latency.py``.

Label Studio runs from its own virtual environment (its pins are not ours), named by ``SAM_MLX_LABEL_STUDIO``:
the venv's folder, its ``python`` or its ``label-studio``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from helpers import IMAGES, MOBILE_SAM

VENV_ENV = "SAM_MLX_LABEL_STUDIO"
LABEL_STUDIO_VERSION = "1.23.2"  # as .ci/run installs it
START_TIMEOUT = 900  # a first start migrates a new database: minutes on a busy 2-core machine
SAM_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Sky"/></BrushLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Car"/><Label value="Sky"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Car"/></RectangleLabels>
</View>"""
# Label Studio's decoder, in its venv: [{rle, width, height}] on stdin -> base64 of the packed H x W masks.
_DECODER = """
import base64, json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
out = []
for item in json.load(sys.stdin):
    alpha = np.reshape(decode_rle(item["rle"]), [item["height"], item["width"], 4])[:, :, 3]
    out.append(base64.b64encode(np.packbits(alpha > 0)).decode())
print(json.dumps(out))
"""


class LabelStudioMissing(RuntimeError):
    """``SAM_MLX_LABEL_STUDIO`` is not set."""


def venv_bin() -> Path:
    """The bin folder of Label Studio's venv named by ``SAM_MLX_LABEL_STUDIO``."""
    given = os.environ.get(VENV_ENV)
    if not given:
        raise LabelStudioMissing(f"{VENV_ENV} is not set: it names Label Studio's venv (python -m venv V && "
                                 f"V/bin/pip install label-studio=={LABEL_STUDIO_VERSION}; {VENV_ENV}=V), "
                                 "which .ci/run makes")
    path = Path(given)
    folder = path / "bin" if path.is_dir() else path.parent
    if not (folder / "label-studio").is_file() or not (folder / "python").exists():
        raise FileNotFoundError(f"{VENV_ENV}={given}: no label-studio and python in {folder}")
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _own_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (Label Studio's venv must not import this tree), plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}


class Process:
    """A child process in a session of its own, its output collected by a thread (to show it when it fails)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path | None = None):
        self.lines: list[str] = []
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def output(self, last: int = 40) -> str:
        return "".join(self.lines[-last:])

    def stop(self) -> int:
        """SIGTERM to its process group (SIGKILL after a minute); its exit code."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.reader.join(10)
        return self.process.returncode


@contextlib.contextmanager
def label_studio(bin_folder: Path, data: Path) -> Iterator[tuple[str, str, float]]:
    """Label Studio on 127.0.0.1 with the data folder ``data`` and a preset legacy token: (base URL, token,
    seconds it took to start). ML backends may be on 127.0.0.1 (``ML_BLOCK_LOCAL_IP``, and
    ``SSRF_PROTECTION_ENABLED`` for the webhook Label Studio adds with a backend)."""
    port, token = _free_port(), secrets.token_hex(20)
    env = _own_env(LABEL_STUDIO_USERNAME="sam-mlx@example.com", LABEL_STUDIO_PASSWORD=secrets.token_hex(8),
                   LABEL_STUDIO_USER_TOKEN=token, LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
                   LABEL_STUDIO_ML_BLOCK_LOCAL_IP="false", LABEL_STUDIO_SSRF_PROTECTION_ENABLED="false",
                   LABEL_STUDIO_LATEST_VERSION_CHECK="false")
    server = Process([str(bin_folder / "label-studio"), "start", "--no-browser", "--host", "127.0.0.1", "--port",
                      str(port), "--data-dir", str(data)], env, cwd=data)
    base = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            if server.process.poll() is not None or time.monotonic() - start > START_TIMEOUT:
                raise RuntimeError(f"Label Studio did not start in {START_TIMEOUT} s:\n{server.output()}")
            time.sleep(1)
        yield base, token, time.monotonic() - start
    finally:
        server.stop()


@contextlib.contextmanager
def backend(label_studio_url: str, api_key: str, tokens_dir: Path, model: str | Path = MOBILE_SAM,
            args: tuple[str, ...] = (), **env: str) -> Iterator[tuple[str, Process]]:
    """``sam-mlx label-studio ARGS`` (this tree) fetching images from Label Studio, ``env`` added to its
    environment: (its URL, process). Stopped with SIGTERM at the end, which must end it with exit code 0."""
    command = [sys.executable, "-m", "sam_mlx.cli", "label-studio", "--model", str(model), "--port", "0",
               "--tokens-dir", str(tokens_dir), *args]
    process = Process(command, {**os.environ, "LABEL_STUDIO_URL": label_studio_url, "LABEL_STUDIO_API_KEY": api_key,
                                **env})
    deadline = time.monotonic() + 300
    while not any("serving http" in line for line in process.lines):
        if process.process.poll() is not None or time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(f"sam-mlx label-studio did not start:\n{process.output()}")
        time.sleep(0.1)
    try:
        yield re.search(r"serving (http://\S+)", "".join(process.lines)).group(1), process
    finally:
        code = process.stop()  # also when the block failed: no backend is left running
    if code != 0:
        raise RuntimeError(f"sam-mlx label-studio ended with exit code {code}:\n{process.output()}")


def personal_access_token(studio: httpx.Client) -> str:
    """A new personal access token (a JWT refresh token, Label Studio's default kind of key) of the client's user."""
    response = studio.post("/api/token/")
    response.raise_for_status()
    return response.json()["token"]


def truck_project(studio: httpx.Client, backend_url: str) -> tuple[int, int, int]:
    """A project with SAM_CONFIG, truck.jpg uploaded as its task, the backend connected for interactive use:
    (project id, task id, ML backend id)."""
    response = studio.post("/api/projects", json={"title": "sam-mlx truck", "label_config": SAM_CONFIG})
    response.raise_for_status()
    project_id = response.json()["id"]
    with open(IMAGES / "truck.jpg", "rb") as image:
        response = studio.post(f"/api/projects/{project_id}/import", files={"file": ("truck.jpg", image, "image/jpeg")})
    response.raise_for_status()
    [task] = studio.get("/api/tasks", params={"project": project_id}).json()["tasks"]
    response = connect(studio, project_id, backend_url)
    response.raise_for_status()
    ml = response.json()
    if ml["readable_state"] != "Connected":
        raise RuntimeError(f"Label Studio did not connect the backend: {ml}")
    return project_id, task["id"], ml["id"]


def connect(studio: httpx.Client, project_id: int, backend_url: str, basic_auth: tuple[str, str] | None = None
            ) -> httpx.Response:
    """Add the backend to the project for interactive use (with basic auth, if given): Label Studio's answer (201
    with its record of the backend, or 400 if the backend did not answer its checks)."""
    auth = {} if basic_auth is None else {"auth_method": "BASIC_AUTH", "basic_auth_user": basic_auth[0],
                                          "basic_auth_pass": basic_auth[1]}
    response = studio.post("/api/ml", json={"url": backend_url, "project": project_id, "title": "sam-mlx",
                                            "is_interactive": True, **auth})
    return response


def decode_with_label_studio(bin_folder: Path, results: list[dict]) -> list[np.ndarray]:
    """Brush results decoded by Label Studio's converter in its venv: H x W bool masks."""
    items = [{"rle": r["value"]["rle"], "width": r["original_width"], "height": r["original_height"]}
             for r in results]
    run = subprocess.run([str(bin_folder / "python"), "-c", _DECODER], input=json.dumps(items), capture_output=True,
                         text=True, env=_own_env(), timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"Label Studio's decoder failed: {run.stderr}")
    masks = []
    for item, packed in zip(items, json.loads(run.stdout)):
        height, width = item["height"], item["width"]
        bits = np.unpackbits(np.frombuffer(base64.b64decode(packed), np.uint8))[: width * height]
        masks.append(bits.reshape(height, width).astype(bool))
    return masks


def keypoint(x: float, y: float, width: int, height: int, positive: bool = True) -> dict:
    """A smart keypoint region as Label Studio's page sends it (pixels given, percent sent)."""
    return {"id": f"k{int(x)}x{int(y)}", "type": "keypointlabels", "from_name": "point", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0, "origin": "manual",
            "is_positive": positive,
            "value": {"x": x / width * 100, "y": y / height * 100, "width": 0.6, "keypointlabels": ["Car"]}}


def rectangle(box: tuple[float, float, float, float], width: int, height: int) -> dict:
    """A smart rectangle region as Label Studio's page sends it (pixels x1, y1, x2, y2 given, percent sent)."""
    x1, y1, x2, y2 = box
    return {"id": "b1", "type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": width,
            "original_height": height, "image_rotation": 0, "origin": "manual",
            "value": {"x": x1 / width * 100, "y": y1 / height * 100, "width": (x2 - x1) / width * 100,
                      "height": (y2 - y1) / height * 100, "rotation": 0, "rectanglelabels": ["Car"]}}


def interactive(studio: httpx.Client, ml_id: int, task_id: int, *regions: dict) -> dict:
    """Label Studio's /api/ml/{id}/interactive-annotating, as its page calls it when a smart region is drawn:
    the answer's one result."""
    response = studio.post(f"/api/ml/{ml_id}/interactive-annotating",
                           json={"task": task_id, "context": {"result": list(regions)}})
    response.raise_for_status()
    answer = response.json()
    if "errors" in answer:
        raise RuntimeError(f"Label Studio reports: {answer['errors']}")
    [result] = answer["data"]["result"]
    return result
