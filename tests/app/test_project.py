"""The app's project store (``sam_mlx.app.project``) on its own: every change, undo/redo, revisions, migrations,
refused files (corrupt, foreign, newer), two writers, and a writer process killed with SIGKILL again and again."""

from __future__ import annotations

import base64
import io
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from sam_mlx.amg.mask_utils import coco_decode_rle, coco_encode_rle, mask_to_rle
from sam_mlx.app import project as project_module
from sam_mlx.app.masks import _read_png, decode_mask, encode_mask
from sam_mlx.app.project import Conflict, NotFound, Project, ProjectError, Step, encode_rle
from sam_mlx.io.images import pixel_fingerprint


def _mask(seed: int, shape: tuple[int, int] = (30, 40)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) > 0.6


def _step(seed: int, points=((5.0, 6.0, 1),), box=None, selected: int = 0) -> Step:
    return Step(points=[list(p) for p in points], box=box, multimask=len(points) == 1, selected=selected,
                score=0.5 + seed / 100, mask=_mask(seed))


@pytest.fixture
def project(tmp_path):
    with Project(tmp_path / "p.sqlite") as opened:
        yield opened


def _image(project: Project, name: str = "a.jpg", seed: int = 0) -> int:
    return project.add_image(f"/photos/{name}", 40, 30, pixel_fingerprint(np.full((30, 40, 3), seed, np.uint8)))


def test_a_new_project_is_wal_with_foreign_keys_and_the_schema_version(tmp_path):
    path = tmp_path / "p.sqlite"
    Project(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == project_module.SCHEMA_VERSION
    assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == "sam_mlx_project"
    with Project(path) as project:
        assert project._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert project.revision == 0


def test_every_change_is_kept_and_reopens(tmp_path, project):
    image = _image(project)
    assert project.image(image)["state"] == "new"
    first = project.add_object(image, "dog", "#ff0000", _step(1))
    assert project.image(image)["state"] == "in_progress"  # the first object starts the image
    second = project.add_object(image, "cat", "#00ff00")
    assert project.add_step(second, _step(2, box=[1, 2, 20, 25])) == 1
    assert project.add_step(first, _step(3, points=((5, 6, 1), (9, 9, 0)))) == 2
    project.choose(first, 1, _mask(4), 0.9)
    project.update_object(second, label="tabby", color="#0000ff")
    project.set_state(image, "done")
    project.set_cleanup(fill_holes=25, simplify=1.5)
    revision = project.revision
    assert revision == 9  # one revision per change (the image's adding included)
    project.close()

    with Project(tmp_path / "p.sqlite") as again:
        assert again.revision == revision
        assert again.image(image)["state"] == "done" and again.image(image)["objects"] == 2
        assert again.cleanup() == {"fill_holes": 25, "remove_islands": 0, "simplify": 1.5}
        dog, cat = again.objects(image)
        assert (dog["label"], dog["color"], dog["cursor"], len(dog["steps"])) == ("dog", "#ff0000", 2, 2)
        assert dog["steps"][1]["points"] == [[5.0, 6.0, 1], [9.0, 9.0, 0]]
        assert dog["steps"][1]["selected"] == 1 and dog["steps"][1]["score"] == 0.9
        assert (cat["label"], cat["color"], cat["steps"][0]["box"]) == ("tabby", "#0000ff", [1.0, 2.0, 20.0, 25.0])
        masks = dict((o["id"], m) for o, m in again.masks(image))
        np.testing.assert_array_equal(masks[first], _mask(4))  # the chosen candidate's mask, pixel for pixel
        np.testing.assert_array_equal(masks[second], _mask(2))
        assert isinstance(dog["mask"]["counts"], str)  # COCO compressed RLE
        again.delete_object(first)
        assert [o["id"] for o in again.objects(image)] == [second]
        assert again._db.execute("SELECT COUNT(*) FROM steps WHERE object_id = ?", (first,)).fetchone()[0] == 0


def test_undo_redo_and_a_new_step_after_undo_drops_the_undone_ones(project):
    image = _image(project)
    obj = project.add_object(image, "o", "#123456", _step(1))
    project.add_step(obj, _step(2))
    project.add_step(obj, _step(3))
    assert project.undo(obj) == 2
    np.testing.assert_array_equal(project.masks(image)[0][1], _mask(2))
    assert project.undo(obj) == 1
    assert project.redo(obj) == 2
    assert project.undo(obj) == 1 and project.undo(obj) == 0 and project.undo(obj) == 0
    assert project.masks(image) == [] and project.objects(image)[0]["mask"] is None
    assert project.redo(obj) == 1
    assert project.add_step(obj, _step(7)) == 2  # steps 2 and 3 were undone: they go
    history = project.objects(image)[0]
    assert len(history["steps"]) == 2 and history["cursor"] == 2
    assert project.redo(obj) == 2  # nothing to redo
    with pytest.raises(ValueError, match="cursor must be 0..2, got 5"):
        project.move_cursor(obj, 5)
    project.undo(obj)
    project.undo(obj)
    with pytest.raises(ValueError, match="no step at its cursor"):
        project.choose(obj, 1, _mask(8))
    cleared = project.add_step(obj, Step(points=[], box=None, multimask=False, selected=0))
    assert cleared == 1 and project.objects(image)[0]["mask"] is None  # a cleared object: a step without a mask


def test_a_stale_write_is_refused_and_changes_nothing(project):
    image = _image(project)
    seen = project.image(image)["revision"]
    obj = project.add_object(image, "o", "#123456", _step(1), expected=seen)
    now = project.image(image)["revision"]
    assert now == seen + 1
    with pytest.raises(Conflict, match=f"revision {now}, this change was made from {seen}"):
        project.update_object(obj, label="late", expected=seen)
    assert project.objects(image)[0]["label"] == "o" and project.image(image)["revision"] == now
    project.update_object(obj, label="on time", expected=now)
    assert project.objects(image)[0]["label"] == "on time"


def test_bad_values_are_refused_by_name(project):
    image = _image(project)
    with pytest.raises(ValueError, match="state is one of new, in_progress, done, skipped, got 'finished'"):
        project.set_state(image, "finished")
    with pytest.raises(ValueError, match="labels 0 or 1"):
        project.add_object(image, "o", "#fff", _step(1, points=((1, 2, 5),)))
    with pytest.raises(ValueError, match="box must be"):
        project.add_object(image, "o", "#fff", _step(1, box=[5, 5, 1, 1]))
    with pytest.raises(ValueError, match="label must be text"):
        project.add_object(image, "", "#fff")
    with pytest.raises(ValueError, match="simplify must be a number >= 0"):
        project.set_cleanup(simplify=-1)
    with pytest.raises(NotFound, match="no object 99"):
        project.undo(99)
    with pytest.raises(NotFound, match="no image 42"):
        project.set_state(42, "done")
    assert project.objects(image) == []  # nothing half-done: a failed change is rolled back whole


def test_a_moved_image_with_the_same_pixels_finds_its_work(tmp_path, project):
    old, new, other = tmp_path / "old.png", tmp_path / "moved" / "renamed.png", tmp_path / "other.png"
    new.parent.mkdir()
    for path in (new, other):
        path.write_bytes(b"x")
    pixels = np.full((30, 40, 3), 7, np.uint8)
    image = project.add_image(old, 40, 30, pixel_fingerprint(pixels))
    project.add_object(image, "o", "#fff", _step(1))
    assert project.add_image(other, 40, 30, pixel_fingerprint(pixels + 1)) != image  # other pixels: a new image
    # While the old file is there, a copy is another image; once it is gone, the same pixels find the work.
    old.write_bytes(b"x")
    copy = project.add_image(new, 40, 30, pixel_fingerprint(pixels))
    assert copy != image
    old.unlink()
    assert project.missing_images() == [image]
    moved = tmp_path / "elsewhere.png"
    assert project.add_image(moved, 40, 30, pixel_fingerprint(pixels.copy())) == image
    assert project.image(image)["path"] == str(moved) and project.image(image)["objects"] == 1


def test_masks_are_stored_as_coco_compressed_rle_exactly():
    """The store's fast encoder against ``mask_utils``' (pycocotools' format): every run, across columns too."""
    rng = np.random.default_rng(5)
    across = np.zeros((6, 4), bool)
    across[4:, 0] = across[:2, 1] = True  # a run from one column's end into the next one's start
    corners = np.zeros((6, 4), bool)
    corners[0, 0] = corners[-1, -1] = True
    masks = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.ones((1, 1), bool), across, corners]
    masks += [rng.random(rng.integers(1, 40, 2)) > rng.random() for _ in range(200)]
    yy, xx = np.mgrid[:1200, :1800]
    masks.append(((yy - 600) / 400) ** 2 + ((xx - 900) / 700) ** 2 < 1)
    for mask in masks:
        rle = encode_rle(mask)
        assert rle == coco_encode_rle(mask_to_rle(mask[None])[0])
        np.testing.assert_array_equal(coco_decode_rle(rle), mask)


def test_the_pages_pngs_are_read_as_pillow_reads_them():
    rng = np.random.default_rng(6)
    for shape in ((1, 1), (3, 9), (17, 8), (120, 181)):
        mask = rng.random(shape) > 0.5
        encoded = encode_mask(mask, "png")
        assert _read_png(base64.b64decode(encoded["png"]), lambda size: None) is not None  # the fast path
        np.testing.assert_array_equal(decode_mask(encoded), mask)
        pillow_pngs = ((Image.fromarray(mask), False), (Image.fromarray(mask.astype(np.uint8) * 255), True))
        for image, pillow_only in pillow_pngs:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")  # Pillow's own PNGs: 1-bit (filtered or not), 8-bit (left to Pillow)
            if pillow_only:
                assert _read_png(buffer.getvalue(), lambda size: None) is None
            np.testing.assert_array_equal(decode_mask({"png": base64.b64encode(buffer.getvalue()).decode()}), mask)


# ---------------------------------------------------------------- versions and refused files
def test_an_older_schema_is_migrated_in_one_transaction(tmp_path, monkeypatch):
    path = tmp_path / "p.sqlite"
    with Project(path) as project:
        image = _image(project)
        project.add_object(image, "o", "#fff", _step(1))

    def add_notes(db):  # a pretend version 2: a column every image gets
        db.execute("ALTER TABLE images ADD COLUMN notes TEXT NOT NULL DEFAULT ''")

    monkeypatch.setattr(project_module, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(project_module.MIGRATIONS, 1, add_notes)
    with Project(path) as project:
        assert project._db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert project._db.execute("SELECT notes FROM images").fetchall() == [("",)]
        assert project.objects(image)[0]["label"] == "o"

    def broken(db):
        db.execute("ALTER TABLE objects ADD COLUMN half TEXT")
        raise RuntimeError("migration failed half way")

    monkeypatch.setattr(project_module, "SCHEMA_VERSION", 3)
    monkeypatch.setitem(project_module.MIGRATIONS, 2, broken)
    with pytest.raises(RuntimeError, match="half way"):
        Project(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2  # rolled back whole: version and column
    assert "half" not in [r[1] for r in db.execute("PRAGMA table_info(objects)")]


def test_a_project_from_a_newer_sam_mlx_is_refused_by_name(tmp_path):
    path = tmp_path / "new.sqlite"
    Project(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(ProjectError, match=r"new.sqlite: made by a newer sam_mlx \(project schema 7; this sam_mlx "
                                           r"reads up to 1\): upgrade"):
        Project(path)


@pytest.mark.parametrize("content", [b"not a database at all, just text\n" * 100,
                                     b"SQLite format 3\x00" + bytes(range(256)) * 20])
def test_a_corrupt_file_is_refused_by_name(tmp_path, content):
    path = tmp_path / "broken.sqlite"
    path.write_bytes(content)
    with pytest.raises(ProjectError, match="broken.sqlite: not a sam_mlx project"):
        Project(path)
    assert path.read_bytes() == content  # left as it was


def test_a_damaged_project_is_refused_by_name(tmp_path):
    path = tmp_path / "damaged.sqlite"
    Project(path).close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the first page's b-tree: sqlite_master unreadable
    path.write_bytes(bytes(data))
    with pytest.raises(ProjectError, match="damaged.sqlite: not a sam_mlx project"):
        Project(path)


def test_a_foreign_database_is_refused_by_name(tmp_path):
    path = tmp_path / "photos.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE albums (id INTEGER PRIMARY KEY, name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(ProjectError, match="photos.db: an SQLite database but not a sam_mlx project"):
        Project(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 1")  # a foreign file that happens to carry a version
    db.commit()
    db.close()
    with pytest.raises(ProjectError, match="photos.db: an SQLite database but not a sam_mlx project"):
        Project(path)
    with pytest.raises(ProjectError, match="a folder, not a project file"):
        Project(tmp_path)


# ---------------------------------------------------------------- writers
def test_two_connections_see_each_others_changes_and_conflicts(tmp_path):
    path = tmp_path / "p.sqlite"
    with Project(path) as one, Project(path) as two:
        image = _image(one)
        seen = two.image(image)["revision"]
        obj = one.add_object(image, "from one", "#fff", _step(1), expected=seen)
        assert two.objects(image)[0]["label"] == "from one"
        with pytest.raises(Conflict):
            two.add_step(obj, _step(2), expected=seen)  # two had not seen one's object
        two.add_step(obj, _step(2), expected=two.image(image)["revision"])
        assert one.objects(image)[0]["cursor"] == 2


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from sam_mlx.app.project import Project, Step
    from sam_mlx.io.images import pixel_fingerprint
    project = Project(sys.argv[1])
    image = project.add_image("/photos/a.jpg", 64, 48, pixel_fingerprint(np.zeros((48, 64, 3), np.uint8)))
    rng = np.random.default_rng(int(sys.argv[2]))
    obj = project.add_object(image, sys.argv[3], "#ff0000")
    print("ready", obj, flush=True)
    for n in range(1, int(sys.argv[4]) + 1):
        project.add_step(obj, Step([[float(n), 1.0, 1]], None, True, 0, None, rng.random((48, 64)) > 0.5))
        print(n, flush=True)  # printed only after the commit
""")


def _writer(path, seed: int, name: str, steps: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(seed), name, str(steps)],
                            stdout=subprocess.PIPE, text=True)


def test_two_writer_processes_at_once_lose_nothing(tmp_path):
    path = tmp_path / "p.sqlite"
    Project(path).close()
    writers = [_writer(path, seed, f"writer {seed}", 60) for seed in (1, 2)]
    for writer in writers:
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 0 and out.split()[-1] == "60"
    with Project(path) as project:
        objects = project.objects(project.find_image("/photos/a.jpg"))
        assert sorted(o["label"] for o in objects) == ["writer 1", "writer 2"]
        for obj in objects:
            assert obj["cursor"] == 60 and [s["points"][0][0] for s in obj["steps"]] == list(range(1, 61))


def test_a_writer_killed_at_random_times_never_loses_a_committed_step_nor_the_file(tmp_path):
    path = tmp_path / "p.sqlite"
    chance = random.Random(33)
    for round_number in range(20):
        writer = _writer(path, round_number, f"round {round_number}", 100_000)
        ready = writer.stdout.readline().split()
        assert ready[0] == "ready", ready
        time.sleep(chance.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == -signal.SIGKILL
        committed = [int(line) for line in out.split()]
        with Project(path) as project:
            assert project._db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            objects = {o["id"]: o for o in project.objects(project.find_image("/photos/a.jpg"))}
            kept = objects[int(ready[1])]
            assert kept["label"] == f"round {round_number}"
            # every step it reported committed is there (and at most the one in flight besides)
            last = committed[-1] if committed else 0
            assert len(kept["steps"]) in (last, last + 1) and kept["cursor"] == len(kept["steps"])
            assert [s["points"][0][0] for s in kept["steps"]] == list(range(1, len(kept["steps"]) + 1))
    assert len(objects) == 20
