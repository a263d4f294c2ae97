"""``sam-mlx label-studio`` connected to a real Label Studio, which asks it for masks as its page does on a click.

Label Studio runs from its own virtual environment (its pins are not ours), found through ``SAM_MLX_LABEL_STUDIO``:
the venv's folder, its ``python`` or its ``label-studio``. ``.ci/run`` makes it; without it the tests fail in CI
(``CI=true``) and are skipped elsewhere. The test starts Label Studio on 127.0.0.1 with a fresh data folder and a
preset token, creates a project with a SAM labelling config, uploads truck.jpg, connects the backend and asks
Label Studio's ``/api/ml/{id}/interactive-annotating`` (the request its page sends when a smart keypoint or box is
drawn) for masks. Label Studio's own converter (``label_studio_sdk.converter.brush.decode_rle``, run in its venv)
decodes what Label Studio returns and stores; the masks must equal ``SamPredictor``'s.
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
from pathlib import Path

import httpx
import numpy as np
import pytest

import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from sam_mlx.checkpoints.load import load_checkpoint

VENV_ENV = "SAM_MLX_LABEL_STUDIO"
CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="brush" toName="image"><Label value="Car"/><Label value="Sky"/></BrushLabels>
  <KeyPointLabels name="point" toName="image" smart="true"><Label value="Car"/><Label value="Sky"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Car"/></RectangleLabels>
</View>"""
WIDTH, HEIGHT = 1800, 1200
WINDOW, TYRE = (500.0, 375.0), (1380.0, 700.0)
TRUCK_BOX = (75.0, 275.0, 1725.0, 850.0)
START_TIMEOUT = 900  # a first start migrates a new database: minutes on a busy 2-core machine
# Label Studio's decoder, in its venv: [{rle, width, height}] on stdin -> base64 of the packed H x W masks.
DECODER = """
import base64, json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
out = []
for item in json.load(sys.stdin):
    alpha = np.reshape(decode_rle(item["rle"]), [item["height"], item["width"], 4])[:, :, 3]
    out.append(base64.b64encode(np.packbits(alpha > 0)).decode())
print(json.dumps(out))
"""


def label_studio_bin() -> Path:
    """The bin folder of Label Studio's venv, from ``SAM_MLX_LABEL_STUDIO``; fail in CI, skip elsewhere."""
    given = os.environ.get(VENV_ENV)
    if not given:
        reason = (f"{VENV_ENV} is not set: it names Label Studio's venv (python -m venv V && V/bin/pip install "
                  f"label-studio; {VENV_ENV}=V), which .ci/run makes")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    path = Path(given)
    folder = path / "bin" if path.is_dir() else path.parent
    if not (folder / "label-studio").is_file() or not (folder / "python").exists():
        pytest.fail(f"{VENV_ENV}={given}: no label-studio and python in {folder}")
    return folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A child process whose output is collected by a thread (to show it when it fails)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path | None = None):
        self.lines: list[str] = []
        self.process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def output(self, last: int = 40) -> str:
        return "".join(self.lines[-last:])

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
        self.reader.join(10)
        return self.process.returncode


@pytest.fixture(scope="module")
def venv_bin() -> Path:
    return label_studio_bin()


@pytest.fixture(scope="module")
def label_studio(venv_bin, tmp_path_factory):
    """Label Studio on 127.0.0.1 with a new data folder: (base URL, legacy token). The ML backend may be on
    127.0.0.1 (``ML_BLOCK_LOCAL_IP``, and ``SSRF_PROTECTION_ENABLED`` for the webhook Label Studio adds with it)."""
    data = tmp_path_factory.mktemp("label_studio_data")
    port, token = free_port(), secrets.token_hex(20)
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "sam-mlx@example.com", "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false", "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
           "LABEL_STUDIO_LATEST_VERSION_CHECK": "false", "LABEL_STUDIO_BASE_DATA_DIR": str(data)}
    env.pop("PYTHONPATH", None)  # Label Studio's venv, not this tree
    server = Process([str(venv_bin / "label-studio"), "start", "--no-browser", "--host", "127.0.0.1", "--port",
                      str(port), "--data-dir", str(data)], env, cwd=data)
    base = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            if server.process.poll() is not None or time.monotonic() - start > START_TIMEOUT:
                pytest.fail(f"Label Studio did not start in {START_TIMEOUT} s:\n{server.output()}")
            time.sleep(1)
        print(f"\nLabel Studio started in {time.monotonic() - start:.0f} s", file=sys.stderr)
        yield base, token
    finally:
        server.stop()


@pytest.fixture(scope="module")
def studio(label_studio) -> httpx.Client:
    base, token = label_studio
    with httpx.Client(base_url=base, headers={"Authorization": f"Token {token}"}, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def backend(label_studio, studio, tmp_path_factory):
    """``sam-mlx label-studio`` fetching uploads from Label Studio with a personal access token (its default kind
    of key, exchanged for access tokens) made through Label Studio's API."""
    base, _ = label_studio
    response = studio.post("/api/token/")
    assert response.status_code in (200, 201), response.text
    env = {**os.environ, "LABEL_STUDIO_URL": base, "LABEL_STUDIO_API_KEY": response.json()["token"]}
    command = [sys.executable, "-m", "sam_mlx.cli", "label-studio", "--model", str(MOBILE_SAM), "--port", "0",
               "--tokens-dir", str(tmp_path_factory.mktemp("label_studio_tokens"))]
    process = Process(command, env)
    deadline = time.monotonic() + 300
    while not any("serving http" in line for line in process.lines):
        if process.process.poll() is not None or time.monotonic() > deadline:
            process.stop()
            pytest.fail(f"sam-mlx label-studio did not start:\n{process.output()}")
        time.sleep(0.1)
    url = re.search(r"serving (http://\S+)", "".join(process.lines)).group(1)
    yield url, process
    code = process.stop()
    assert code == 0, process.output()


@pytest.fixture(scope="module")
def project(studio, backend):
    """(project id, task id, ML backend id): truck.jpg uploaded, the backend connected for interactive use."""
    response = studio.post("/api/projects", json={"title": "sam-mlx truck", "label_config": CONFIG})
    assert response.status_code == 201, response.text
    project_id = response.json()["id"]
    with open(IMAGES / "truck.jpg", "rb") as image:
        response = studio.post(f"/api/projects/{project_id}/import", files={"file": ("truck.jpg", image, "image/jpeg")})
    assert response.status_code == 201, response.text
    [task] = studio.get("/api/tasks", params={"project": project_id}).json()["tasks"]
    assert task["data"]["image"].startswith("/data/upload/")
    response = studio.post("/api/ml", json={"url": backend[0], "project": project_id, "title": "sam-mlx",
                                            "is_interactive": True})
    assert response.status_code == 201, response.text
    ml = response.json()
    assert ml["readable_state"] == "Connected", ml
    return project_id, task["id"], ml["id"]


@pytest.fixture(scope="module")
def truck():
    predictor = sam_mlx.SamPredictor(load_checkpoint(MOBILE_SAM))
    predictor.set_image(IMAGES / "truck.jpg")
    return predictor


def ls_decode(venv_bin: Path, results: list[dict]) -> list[np.ndarray]:
    """Brush results decoded by Label Studio's converter in its venv."""
    items = [{"rle": r["value"]["rle"], "width": r["original_width"], "height": r["original_height"]}
             for r in results]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([str(venv_bin / "python"), "-c", DECODER], input=json.dumps(items), capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    return [np.unpackbits(np.frombuffer(base64.b64decode(packed), np.uint8))[: WIDTH * HEIGHT].reshape(HEIGHT, WIDTH)
            .astype(bool) for packed in json.loads(run.stdout)]


def click(studio: httpx.Client, project: tuple, *regions: dict) -> dict:
    """Ask Label Studio for a prediction as its page does when a smart region is drawn -> the one brush result."""
    _, task_id, ml_id = project
    response = studio.post(f"/api/ml/{ml_id}/interactive-annotating",
                           json={"task": task_id, "context": {"result": list(regions)}})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "errors" not in answer, answer
    [result] = answer["data"]["result"]
    assert result["type"] == "brushlabels" and result["from_name"] == "brush" and result["to_name"] == "image"
    assert (result["original_width"], result["original_height"]) == (WIDTH, HEIGHT)
    return result


def keypoint(x: float, y: float, positive: bool = True) -> dict:
    return {"id": f"k{int(x)}", "type": "keypointlabels", "from_name": "point", "to_name": "image",
            "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "origin": "manual",
            "is_positive": positive,
            "value": {"x": x / WIDTH * 100, "y": y / HEIGHT * 100, "width": 0.6, "keypointlabels": ["Car"]}}


def test_a_positive_point_through_label_studio(venv_bin, studio, project, truck):
    result = click(studio, project, keypoint(*WINDOW))
    [mask] = ls_decode(venv_bin, [result])
    masks, scores, _ = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))
    assert np.array_equal(mask, masks[best])
    assert result["score"] == pytest.approx(float(scores[best]), abs=1e-5)
    assert result["value"]["brushlabels"] == ["Car"]


def test_a_positive_and_a_negative_point_through_label_studio(venv_bin, studio, project, truck):
    """The user clicks the window, then Alt-clicks the tyre: the second request refines the first mask."""
    click(studio, project, keypoint(*WINDOW))
    result = click(studio, project, keypoint(*WINDOW), keypoint(*TYRE, positive=False))
    [mask] = ls_decode(venv_bin, [result])
    _, scores, low_res = truck.predict(np.array([WINDOW]), np.array([1]), multimask_output=True)
    masks, scores, _ = truck.predict(np.array([WINDOW, TYRE]), np.array([1, 0]),
                                     mask_input=low_res[[int(np.argmax(scores))]], multimask_output=False)
    assert np.array_equal(mask, masks[0])
    assert result["score"] == pytest.approx(float(scores[0]), abs=1e-5)


def test_a_box_through_label_studio_and_stored_as_an_annotation(venv_bin, studio, project, truck):
    x1, y1, x2, y2 = TRUCK_BOX
    box = {"id": "b1", "type": "rectanglelabels", "from_name": "box", "to_name": "image", "original_width": WIDTH,
           "original_height": HEIGHT, "image_rotation": 0, "origin": "manual",
           "value": {"x": x1 / WIDTH * 100, "y": y1 / HEIGHT * 100, "width": (x2 - x1) / WIDTH * 100,
                     "height": (y2 - y1) / HEIGHT * 100, "rotation": 0, "rectanglelabels": ["Car"]}}
    result = click(studio, project, box)
    masks, scores, _ = truck.predict(box=np.array(TRUCK_BOX), multimask_output=False)
    # the user accepts the suggestion: Label Studio stores it in an annotation, and gives it back
    response = studio.post(f"/api/tasks/{project[1]}/annotations", json={"result": [result]})
    assert response.status_code == 201, response.text
    stored = studio.get(f"/api/annotations/{response.json()['id']}").json()["result"]
    returned, kept = ls_decode(venv_bin, [result, *stored])
    assert np.array_equal(returned, masks[0]) and np.array_equal(kept, masks[0])
    assert result["score"] == pytest.approx(float(scores[0]), abs=1e-5)
