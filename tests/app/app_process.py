"""Run ``sam-mlx app`` as a real subprocess for the app's tests, and talk to it."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from sam_mlx.checkpoints.load import load_checkpoint

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@dataclass
class RunningApp:
    process: subprocess.Popen
    url: str  # the page's address with its token, as the command prints it
    base: str  # http://127.0.0.1:PORT
    token: str
    lines: list[str] = field(default_factory=list)  # stderr so far
    reader: threading.Thread | None = None
    root: Path | None = None  # the folder of its photos, exports and tokens (``served``)

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTP client of the API, with the run's token unless another (or "") is given."""
        token = self.token if token is None else token
        return httpx.Client(base_url=self.base, headers={"X-SAM-Token": token} if token else {}, timeout=120)

    def wait_ready(self, image_id: int, timeout: float = 180) -> dict:
        """Ask the app to encode an image and wait until it is ready."""
        with self.client() as client:
            client.post(f"/api/images/{image_id}/encode", json={"prefetch": 0}).raise_for_status()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                record = client.get(f"/api/images/{image_id}").json()
                if record["status"] in ("ready", "error"):
                    assert record["status"] == "ready", record
                    return record
                time.sleep(0.1)
        raise TimeoutError(f"image {image_id} not encoded in {timeout} s")

    def stop(self, signal_number: int = signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
        """Send a signal; return the exit code and everything the app wrote to stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal_number)
        code = self.process.wait(timeout)
        self.reader.join(timeout)
        return code, "".join(self.lines)


def start_app(*args: str, env: dict[str, str] | None = None, timeout: float = 180,
              cwd: Path | None = None) -> RunningApp:
    """``sam-mlx app ARGS --model MobileSAM --no-browser --port 0``, once it serves. (``python -m`` imports from
    ``cwd`` first: run another tree's app from a folder without a ``sam_mlx`` in it.)"""
    command = [sys.executable, "-m", "sam_mlx.cli", "app", *args, "--no-browser", "--port", "0"]
    if "--model" not in args:
        command += ["--model", str(MOBILE_SAM)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=cwd)
    lines: list[str] = []
    served = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if "serving http" in line:
                served.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not served.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("sam-mlx app did not start:\n" + "".join(lines))
    url = re.search(r"(http://\S+)", next(line for line in lines if "serving http" in line)).group(1)
    base, token = url.split("/#token=")
    return RunningApp(process, url, base, token, lines, reader)


def start_dog_and_truck_app(tmp_path: Path) -> RunningApp:
    """The app on a photos folder of dog.jpg and truck.jpg (images 0 and 1), nothing prefetched, its tokens and
    exports in ``tmp_path``: the images encode only when asked."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("dog.jpg", "truck.jpg"):
        shutil.copy(IMAGES / name, photos / name)
    return start_app(str(photos), "--prefetch", "0", "--tokens-dir", str(tmp_path / "tokens"),
                     "--out-dir", str(tmp_path / "out"))


@contextlib.contextmanager
def served(root: Path, ready: tuple[int, ...] = ()):
    """The app on copies of dog.jpg and truck.jpg (ids 0 and 1) in ``root/photos``, exporting to ``root/export``;
    the images in ``ready`` encoded first. Stopped with SIGTERM at the end, which must end it cleanly."""
    (root / "photos").mkdir(parents=True, exist_ok=True)
    for name in ("dog.jpg", "truck.jpg"):
        shutil.copy(IMAGES / name, root / "photos" / name)
    app = start_app(str(root / "photos"), "--out-dir", str(root / "export"), "--tokens-dir", str(root / "tokens"))
    app.root = root
    for image_id in ready:
        app.wait_ready(image_id)
    yield app
    code, log = app.stop(signal.SIGTERM)
    assert code == 0, log


def truck_predictor() -> sam_mlx.SamPredictor:
    """MobileSAM at the original sizing with truck.jpg encoded in this process."""
    predictor = sam_mlx.SamPredictor(load_checkpoint(MOBILE_SAM))
    predictor.set_image(IMAGES / "truck.jpg")
    return predictor
