"""The project's HTTP endpoints against a real ``sam-mlx app`` process, its restart after SIGKILL, and
``sam-mlx export`` of the project against the app's export (same files)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from app_process import served, start_app
from PIL import Image

from helpers import IMAGES
from sam_mlx.app.masks import decode_mask, encode_mask
from sam_mlx.app.project import Project

DOG, TRUCK = 0, 1
DOG_SIZE = Image.open(IMAGES / "dog.jpg").size  # width, height


def _mask(seed: int, size=DOG_SIZE) -> np.ndarray:
    mask = np.zeros(size[::-1], bool)
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    mask[y:y + size[1] // 3, x:x + size[0] // 3] = True
    return mask


def _step(seed: int, points=((100.0, 120.0, 1),), **extra) -> dict:
    return {"points": [list(p) for p in points], "box": None, "multimask": len(points) == 1, "selected": 0,
            "score": 0.9, "mask": encode_mask(_mask(seed), "png"), **extra}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with served(tmp_path_factory.mktemp("project_api")) as running:
        yield running


def test_project_endpoints_need_the_token(app):
    with app.client(token="") as client:
        assert client.get("/api/project").status_code == 403
        assert client.post(f"/api/images/{DOG}/objects", json={"label": "x", "color": "#fff"}).status_code == 403
        assert client.delete("/api/objects/1").status_code == 403
    with app.client() as client:
        assert client.get("/api/project", headers={"Host": "attacker.example"}).status_code == 400


def test_every_change_is_kept_and_a_stale_one_refused(app):
    with app.client() as client:
        listed = client.get(f"/api/images/{DOG}/objects").json()
        assert listed["objects"] == [] and listed["state"] == "new"
        made = client.post(f"/api/images/{DOG}/objects", json={"label": "dog", "color": "#ff0000", "step": _step(1),
                                                                "revision": listed["revision"]}).json()
        obj, revision = made["object"], made["revision"]
        assert made["state"] == "in_progress"
        changed = client.post(f"/api/objects/{obj}/steps", json={"step": _step(2, points=((100, 120, 1), (5, 5, 0))),
                                                                 "revision": revision}).json()
        assert changed["cursor"] == 2
        stale = client.post(f"/api/objects/{obj}", json={"label": "late", "revision": revision})
        assert stale.status_code == 409 and "changed elsewhere" in stale.json()["error"]
        revision = changed["revision"]
        chosen = {"selected": 2, "mask": encode_mask(_mask(3), "rle"), "score": 0.7, "revision": revision}
        revision = client.post(f"/api/objects/{obj}/choose", json=chosen).json()["revision"]
        revision = client.post(f"/api/objects/{obj}/cursor", json={"cursor": 1, "revision": revision}).json()
        revision = revision["revision"]
        revision = client.post(f"/api/objects/{obj}", json={"label": "good dog", "color": "#00ff00",
                                                            "revision": revision}).json()["revision"]
        other = client.post(f"/api/images/{DOG}/objects", json={"label": "ball", "color": "#0000ff",
                                                                "step": _step(4), "revision": revision}).json()
        listed = client.get(f"/api/images/{DOG}/objects").json()
        assert listed["revision"] == other["revision"]
        first, second = listed["objects"]
        assert (first["label"], first["color"], first["cursor"], len(first["steps"])) == ("good dog", "#00ff00", 1, 2)
        assert first["steps"][1]["selected"] == 2 and first["steps"][1]["score"] == 0.7
        np.testing.assert_array_equal(decode_mask(first["steps"][0]["mask"]), _mask(1))
        np.testing.assert_array_equal(decode_mask(first["steps"][1]["mask"]), _mask(3))
        assert first["steps"][0]["mask"]["box"] is not None  # drawn by the page as a decode's mask is
        rle = client.get(f"/api/images/{DOG}/objects", params={"mask_format": "rle"}).json()
        np.testing.assert_array_equal(decode_mask(rle["objects"][1]["steps"][0]["mask"]), _mask(4))
        assert client.delete(f"/api/objects/{second['id']}", params={"revision": listed["revision"]}).status_code == 200
        state = client.post(f"/api/images/{DOG}/state", json={"state": "done"}).json()
        assert state["state"] == "done"
        project = client.get("/api/project").json()
        assert project["path"] == str(app.root / "export" / "sam-mlx.sqlite")
        assert (project["done"], project["total"]) == (1, 2)
        assert project["images"][DOG] == {"id": DOG, "state": "done", "objects": 1, "revision": state["revision"]}
        assert project["images"][TRUCK]["state"] == "new"


def test_bad_requests_are_refused_by_name(app):
    with app.client() as client:
        cases = [
            (f"/api/images/{DOG}/objects", {"label": "x", "color": "#fff", "step": {"points": [[1, 2, 1]]}},
             400, "needs the mask of its chosen candidate"),
            (f"/api/images/{DOG}/objects", {"label": "x", "color": "#fff",
                                            "step": _step(1, mask=encode_mask(np.zeros((10, 10), bool), "png"))},
             400, "mask is 10x10 but the image is 800x534"),
            (f"/api/images/{DOG}/state", {"state": "finished"}, 400, "state must be one of new, in_progress"),
            ("/api/objects/999/steps", {"step": _step(1)}, 404, "no object 999"),
            ("/api/images/99/objects", {"label": "x", "color": "#fff"}, 404, "no image with id 99"),
            (f"/api/images/{DOG}/objects", {"label": "x", "color": "#fff", "revision": "1"}, 400, "revision must be"),
        ]
        for path, body, status, message in cases:
            response = client.post(path, json=body)
            assert response.status_code == status and message in response.json()["error"], (path, response.text)


def test_a_killed_server_restarts_with_every_change_and_exports_as_the_command(tmp_path):
    (tmp_path / "photos").mkdir()
    for name in ("dog.jpg", "truck.jpg"):
        shutil.copy(IMAGES / name, tmp_path / "photos" / name)
    arguments = (str(tmp_path / "photos"), "--out-dir", str(tmp_path / "export"),
                 "--tokens-dir", str(tmp_path / "tokens"))
    first = start_app(*arguments)
    with first.client() as client:
        client.post(f"/api/images/{DOG}/objects", json={"label": "dog", "color": "#ff0000", "step": _step(5)})
        client.post(f"/api/images/{DOG}/objects", json={"label": "ear", "color": "#00ff00", "step": _step(6)})
        client.post(f"/api/images/{DOG}/state", json={"state": "skipped"})
    assert first.stop(signal.SIGKILL)[0] == -signal.SIGKILL
    again = start_app(*arguments)
    try:
        with again.client() as client:
            listed = client.get(f"/api/images/{DOG}/objects").json()
            assert [o["label"] for o in listed["objects"]] == ["dog", "ear"] and listed["state"] == "skipped"
            np.testing.assert_array_equal(decode_mask(listed["objects"][1]["steps"][0]["mask"]), _mask(6))
            client.post("/api/project/cleanup", json={"fill_holes": 100})
            page = client.post("/api/project/export", json={"folder": "page", "formats": ["coco", "png"]}).json()
            mine = tmp_path / "export" / "mine" / "coco.json"  # the user's own file: an export does not replace it
            mine.parent.mkdir()
            mine.write_text("{}")
            refused = client.post("/api/project/export", json={"folder": "mine", "formats": ["coco"]})
            assert refused.status_code == 409 and "not written by an export of the app" in refused.json()["error"]
            assert mine.read_text() == "{}" and sorted(p.name for p in mine.parent.iterdir()) == ["coco.json"]
    finally:
        assert again.stop()[0] == 0
    project = str(tmp_path / "export" / "sam-mlx.sqlite")
    command = subprocess.run([sys.executable, "-m", "sam_mlx.cli", "export", project,
                              "--export", "coco,png", "--out-dir", str(tmp_path / "command")],
                             capture_output=True, text=True, timeout=300)
    assert command.returncode == 0, command.stderr
    page_dir, command_dir = tmp_path / "export" / "page", tmp_path / "command"
    assert sorted(page["files"]) == sorted(p.name for p in command_dir.iterdir()) == \
        ["coco.json", "dog.prompts.json", "dog_mask0.png", "dog_mask1.png"]
    for name in ("dog_mask0.png", "dog_mask1.png", "dog.prompts.json"):
        assert (page_dir / name).read_bytes() == (command_dir / name).read_bytes(), name
    coco = [json.loads((folder / "coco.json").read_text()) for folder in (page_dir, command_dir)]
    for dataset in coco:
        dataset.pop("info")  # its date
    assert coco[0] == coco[1] and len(coco[0]["annotations"]) == 2
    assert json.loads((command_dir / "dog.prompts.json").read_text())["cleanup"]["fill_holes"] == 100


def test_the_export_command_refuses_a_missing_or_foreign_project(tmp_path):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("hello\n" * 200)
    for path, message in ((tmp_path / "none.sqlite", "none.sqlite: no such project file"),
                          (foreign, "notes.txt: not a sam_mlx project")):
        result = subprocess.run([sys.executable, "-m", "sam_mlx.cli", "export", str(path), "--out-dir",
                                 str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and message in result.stderr, result.stderr
    with Project(tmp_path / "empty.sqlite"):
        pass
    result = subprocess.run([sys.executable, "-m", "sam_mlx.cli", "export", str(tmp_path / "empty.sqlite"),
                             "--out-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "0 files" in result.stderr


def test_a_moved_folder_finds_its_work_by_the_pixels(tmp_path):
    (tmp_path / "photos").mkdir()
    for name in ("dog.jpg", "truck.jpg"):
        shutil.copy(IMAGES / name, tmp_path / "photos" / name)
    project = tmp_path / "work.sqlite"
    first = start_app(str(tmp_path / "photos"), "--project", str(project), "--out-dir", str(tmp_path / "export"),
                      "--tokens-dir", str(tmp_path / "tokens"))
    try:
        with first.client() as client:
            client.post(f"/api/images/{DOG}/objects", json={"label": "dog", "color": "#ff0000", "step": _step(7)})
    finally:
        assert first.stop()[0] == 0
    (tmp_path / "photos").rename(tmp_path / "moved")
    (tmp_path / "moved" / "dog.jpg").rename(tmp_path / "moved" / "a dog.jpg")
    again = start_app(str(tmp_path / "moved"), "--project", str(project), "--out-dir", str(tmp_path / "export"),
                      "--tokens-dir", str(tmp_path / "tokens"))
    try:
        with again.client() as client:
            deadline = time.monotonic() + 60
            while client.get("/api/project").json()["images"][DOG]["objects"] == 0:  # found in the background
                assert time.monotonic() < deadline, "the moved image's work was not found"
                time.sleep(0.2)
            listed = client.get(f"/api/images/{DOG}/objects").json()
            assert [o["label"] for o in listed["objects"]] == ["dog"]
            np.testing.assert_array_equal(decode_mask(listed["objects"][0]["steps"][0]["mask"]), _mask(7))
    finally:
        assert again.stop()[0] == 0
    with Project(project) as kept:
        assert [Path(r["path"]).name for r in kept.images()] == ["a dog.jpg"]
