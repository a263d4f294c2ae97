"""The app's project: one SQLite file that keeps the images, objects and prompt steps as they are made.

Every change is one transaction (WAL journal, foreign keys on), so a killed server loses at most the change in
flight and never the file. The schema is versioned (``PRAGMA user_version``) and brought up to date by
``MIGRATIONS`` on open; a file from a newer sam_mlx, a corrupt file and a foreign database are refused by name.

Objects follow the page's model: an object is a list of prompt steps (points with labels, box, multimask, the
candidate chosen and that candidate's mask, COCO compressed RLE); ``cursor`` is the undo position (the number of
steps in effect, 0 for none), and a new step after an undo drops the steps after the cursor, as editors do.
Every change bumps the project's revision and its image's: a write may carry the image revision it was made
from, and one made from an older revision is refused (``Conflict``), so two tabs never silently overwrite.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..amg.mask_utils import coco_decode_rle

FORMAT = "sam_mlx_project"
SCHEMA_VERSION = 1
STATES = ("new", "in_progress", "done", "skipped")
CLEANUP_KEYS = ("fill_holes", "remove_islands", "simplify")
BUSY_TIMEOUT_MS = 10_000

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    width INTEGER NOT NULL CHECK (width > 0),
    height INTEGER NOT NULL CHECK (height > 0),
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'new' CHECK (state IN ('new', 'in_progress', 'done', 'skipped')),
    revision INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX images_by_fingerprint ON images (fingerprint);
CREATE TABLE objects (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    position REAL NOT NULL,
    label TEXT NOT NULL,
    color TEXT NOT NULL,
    cursor INTEGER NOT NULL DEFAULT 0 CHECK (cursor >= 0)
);
CREATE INDEX objects_by_image ON objects (image_id, position);
CREATE TABLE steps (
    object_id INTEGER NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    position INTEGER NOT NULL CHECK (position >= 1),
    points TEXT NOT NULL,
    box TEXT,
    multimask INTEGER NOT NULL,
    selected INTEGER NOT NULL CHECK (selected >= 0),
    score REAL,
    mask_height INTEGER,
    mask_width INTEGER,
    mask_counts TEXT,
    PRIMARY KEY (object_id, position)
) WITHOUT ROWID;
"""


def _create_v1(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1.split(";"):
        if statement.strip():
            db.execute(statement)
    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                   [("format", FORMAT), ("revision", "0"),
                    ("cleanup", json.dumps({"fill_holes": 0, "remove_islands": 0, "simplify": None}))])


# MIGRATIONS[n] brings a database of schema version n to version n + 1 (0: an empty file, the first schema).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {0: _create_v1}


class ProjectError(ValueError):
    """A project file that cannot be opened: corrupt, foreign, or from a newer sam_mlx."""


class Conflict(RuntimeError):
    """A write made from an older revision of the image than the project's (another tab or program changed it)."""


class NotFound(KeyError):
    """An image or object the project does not have."""


@dataclass(frozen=True)
class Step:
    """One prompt step of an object. ``points``: [[x, y, label], ...] in image pixels (label 1 in, 0 out);
    ``box``: x1, y1, x2, y2 or None; ``mask``: H x W bool of the chosen candidate (None for a cleared object)."""

    points: list[list[float]]
    box: list[float] | None
    multimask: bool
    selected: int
    score: float | None = None
    mask: np.ndarray | None = None


def encode_rle(mask: np.ndarray) -> dict:
    """H x W bool -> COCO compressed RLE ``{"size": [H, W], "counts": str}``, as ``mask_utils``' ``mask_to_rle``
    and ``rle_to_coco_string`` give it, ~10x faster (a save must not slow a click): the runs are found from the
    row-to-row changes inside the mask's bounding box (no column-major copy of the image), the string's 5-bit groups
    for all counts at once."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return {"size": [height, width], "counts": _coco_string(np.array([height * width]))}
    top, left = rows[0], cols[0]
    inside = mask[top:rows[-1] + 1, left:cols[-1] + 1]
    padded = np.zeros((inside.shape[0] + 2, inside.shape[1]), bool)
    padded[1:-1] = inside
    # a change above row r of a column (flatnonzero: ~10x faster than a 2-d nonzero)
    change_rows, change_cols = np.divmod(np.flatnonzero(padded[1:] != padded[:-1]), inside.shape[1])
    changes = (change_cols + left) * height + change_rows + top  # column-major positions where a run starts
    changes.sort()
    # A run of ones through a column's end into the next column's start shows as two equal positions: no change.
    joined = np.flatnonzero(changes[1:] == changes[:-1])
    changes = np.delete(changes, np.concatenate([joined, joined + 1]))
    changes = changes[changes < height * width]  # the mask's end is no change
    counts = np.diff(np.concatenate([[0], changes, [height * width]]))
    return {"size": [height, width], "counts": _coco_string(counts)}


def _coco_string(counts: np.ndarray) -> str:
    """pycocotools' ``rleToString`` of run lengths: each count from the fourth on as its difference with the count two
    before, written as little-endian 5-bit groups (``chr(48 + g)``; 0x20 marks more groups, 0x10 of the last one is
    the sign); every count's groups computed together."""
    values = counts.astype(np.int64)
    values[3:] -= counts[1:-2]
    groups, wanted = [], []
    active = np.ones(len(values), bool)
    while active.any():
        group = values & 0x1F
        values = values >> 5  # arithmetic shift, as the C code's on a signed long
        more = np.where(group & 0x10, values != -1, values != 0) & active
        groups.append(48 + (group | (more << 5)))
        wanted.append(active)
        active = more
    chars = np.stack(groups, axis=1)[np.stack(wanted, axis=1)]  # each count's groups, count after count
    return chars.astype(np.uint8).tobytes().decode("ascii")


class Project:
    """One project file, safe to share between threads (one connection behind a lock) and processes (SQLite)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        self._lock = threading.RLock()
        self._db = _connect(self.path)
        try:
            _upgrade(self._db, self.path)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- transactions
    @contextlib.contextmanager
    def _write(self, image_id: int | None = None, expected: int | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction: checks the image's revision against ``expected``, bumps both revisions."""
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if image_id is not None:
                    row = db.execute("SELECT revision FROM images WHERE id = ?", (image_id,)).fetchone()
                    if row is None:
                        raise NotFound(f"no image {image_id} in project {self.path}")
                    if expected is not None and row[0] != expected:
                        raise Conflict(f"image {image_id} changed elsewhere (revision {row[0]}, this change was "
                                       f"made from {expected}): reload it")
                    db.execute("UPDATE images SET revision = revision + 1 WHERE id = ?", (image_id,))
                yield db
                db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---------------------------------------------------------------- project
    @property
    def revision(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key = 'revision'")[0][0])

    def meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = ?",
                       (key, value, value))

    def cleanup(self) -> dict:
        """The clean-up settings: fill_holes, remove_islands (pixels), simplify (polygon tolerance in pixels; None:
        the export's default)."""
        return json.loads(self.meta("cleanup"))

    def set_cleanup(self, **settings: float) -> dict:
        unknown = set(settings) - set(CLEANUP_KEYS)
        if unknown:
            raise ValueError(f"clean-up settings are {', '.join(CLEANUP_KEYS)}, not {', '.join(sorted(unknown))}")
        for key, value in settings.items():
            if key == "simplify" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"clean-up {key} must be a number >= 0, got {value!r}")
        merged = {**self.cleanup(), **settings}
        with self._write() as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'cleanup'", (json.dumps(merged),))
        return merged

    # ---------------------------------------------------------------- images
    def find_image(self, path: str | Path) -> int | None:
        rows = self._read("SELECT id FROM images WHERE path = ?", (str(path),))
        return rows[0][0] if rows else None

    def add_image(self, path: str | Path, width: int, height: int, fingerprint: str) -> int:
        """The image's id: the row of this path, else the row of a missing file with the same pixels (a moved
        or renamed image: its path is updated), else a new row."""
        path = str(path)
        with self._write() as db:
            row = db.execute("SELECT id FROM images WHERE path = ?", (path,)).fetchone()
            if row:
                return row[0]
            for image_id, old_path in db.execute("SELECT id, path FROM images WHERE fingerprint = ? ORDER BY id",
                                                 (fingerprint,)).fetchall():
                if not Path(old_path).exists():
                    db.execute("UPDATE images SET path = ? WHERE id = ?", (path, image_id))
                    return image_id
            return db.execute("INSERT INTO images (path, width, height, fingerprint) VALUES (?, ?, ?, ?)",
                              (path, width, height, fingerprint)).lastrowid

    def missing_images(self) -> list[int]:
        """The ids of images whose file is no longer at its path (candidates for ``add_image``'s matching)."""
        return [i for i, path in self._read("SELECT id, path FROM images ORDER BY id") if not Path(path).exists()]

    _IMAGE_COLUMNS = ("id", "path", "width", "height", "state", "revision", "fingerprint", "objects")
    _IMAGE_SELECT = ("SELECT i.id, i.path, i.width, i.height, i.state, i.revision, i.fingerprint, "
                     "(SELECT COUNT(*) FROM objects o WHERE o.image_id = i.id) FROM images i")

    def images(self) -> list[dict]:
        """Every image: id, path, width, height, state, revision and object count, in order of adding."""
        return [dict(zip(self._IMAGE_COLUMNS, row)) for row in self._read(self._IMAGE_SELECT + " ORDER BY i.id")]

    def image(self, image_id: int) -> dict:
        """``images()``' record of one image."""
        rows = self._read(self._IMAGE_SELECT + " WHERE i.id = ?", (image_id,))
        if not rows:
            raise NotFound(f"no image {image_id} in project {self.path}")
        return dict(zip(self._IMAGE_COLUMNS, rows[0]))

    def set_state(self, image_id: int, state: str, expected: int | None = None) -> None:
        if state not in STATES:
            raise ValueError(f"an image's state is one of {', '.join(STATES)}, got {state!r}")
        with self._write(image_id, expected) as db:
            db.execute("UPDATE images SET state = ? WHERE id = ?", (state, image_id))

    # ---------------------------------------------------------------- objects
    def objects(self, image_id: int) -> list[dict]:
        """The image's objects in order: id, label, color, cursor, steps (``Step`` fields as JSON, the mask as
        COCO compressed RLE), ``mask`` (the current one: the step at the cursor's, or None)."""
        with self._lock:
            objects = self._db.execute("SELECT id, label, color, cursor FROM objects WHERE image_id = ? "
                                       "ORDER BY position, id", (image_id,)).fetchall()
            steps = self._db.execute(
                "SELECT s.object_id, s.points, s.box, s.multimask, s.selected, s.score, s.mask_height, "
                "s.mask_width, s.mask_counts FROM steps s JOIN objects o ON o.id = s.object_id "
                "WHERE o.image_id = ? ORDER BY s.object_id, s.position", (image_id,)).fetchall()
        by_object: dict[int, list[dict]] = {}
        for object_id, points, box, multimask, selected, score, height, width, counts in steps:
            mask = None if counts is None else {"size": [height, width], "counts": counts}
            by_object.setdefault(object_id, []).append(
                {"points": json.loads(points), "box": json.loads(box) if box else None, "multimask": bool(multimask),
                 "selected": selected, "score": score, "mask": mask})
        result = []
        for object_id, label, color, cursor in objects:
            history = by_object.get(object_id, [])
            result.append({"id": object_id, "label": label, "color": color, "cursor": cursor, "steps": history,
                           "mask": history[cursor - 1]["mask"] if cursor else None})
        return result

    def object_image(self, object_id: int) -> int:
        rows = self._read("SELECT image_id FROM objects WHERE id = ?", (object_id,))
        if not rows:
            raise NotFound(f"no object {object_id} in project {self.path}")
        return rows[0][0]

    def add_object(self, image_id: int, label: str, color: str, first: Step | None = None,
                   expected: int | None = None) -> int:
        """A new object at the end of the image's list (with its first step, in the same transaction)."""
        with self._write(image_id, expected) as db:
            position = db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM objects WHERE image_id = ?",
                                  (image_id,)).fetchone()[0]
            object_id = db.execute("INSERT INTO objects (image_id, position, label, color) VALUES (?, ?, ?, ?)",
                                   (image_id, position, _text(label, "label"), _text(color, "color"))).lastrowid
            if first is not None:
                self._insert_step(db, object_id, 0, first)
            self._mark_started(db, image_id)
        return object_id

    def add_step(self, object_id: int, step: Step, expected: int | None = None) -> int:
        """Add a step after the cursor (dropping the undone steps past it); return the new cursor."""
        image_id = self.object_image(object_id)
        with self._write(image_id, expected) as db:
            cursor = db.execute("SELECT cursor FROM objects WHERE id = ?", (object_id,)).fetchone()[0]
            self._insert_step(db, object_id, cursor, step)
            self._mark_started(db, image_id)
        return cursor + 1

    @staticmethod
    def _insert_step(db: sqlite3.Connection, object_id: int, cursor: int, step: Step) -> None:
        db.execute("DELETE FROM steps WHERE object_id = ? AND position > ?", (object_id, cursor))
        mask = None if step.mask is None else encode_rle(step.mask)
        db.execute("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (object_id, cursor + 1, json.dumps(_points(step.points)), _box(step.box), int(step.multimask),
                    _index(step.selected), step.score, *(mask["size"] if mask else (None, None)),
                    mask["counts"] if mask else None))
        db.execute("UPDATE objects SET cursor = ? WHERE id = ?", (cursor + 1, object_id))

    @staticmethod
    def _mark_started(db: sqlite3.Connection, image_id: int) -> None:
        db.execute("UPDATE images SET state = 'in_progress' WHERE id = ? AND state = 'new'", (image_id,))

    def choose(self, object_id: int, selected: int, mask: np.ndarray, score: float | None = None,
               expected: int | None = None) -> None:
        """Choose another candidate (and its mask) for the step at the object's cursor."""
        image_id = self.object_image(object_id)
        rle = encode_rle(mask)
        with self._write(image_id, expected) as db:
            changed = db.execute("UPDATE steps SET selected = ?, score = ?, mask_height = ?, mask_width = ?, "
                                 "mask_counts = ? WHERE object_id = ? AND position = "
                                 "(SELECT cursor FROM objects WHERE id = ?)",
                                 (_index(selected), score, *rle["size"], rle["counts"], object_id, object_id))
            if not changed.rowcount:
                raise ValueError(f"object {object_id} has no step at its cursor to choose a candidate for")

    def move_cursor(self, object_id: int, cursor: int, expected: int | None = None) -> None:
        """Undo (a smaller cursor) or redo (a larger one, up to the number of steps)."""
        image_id = self.object_image(object_id)
        with self._write(image_id, expected) as db:
            count = db.execute("SELECT COUNT(*) FROM steps WHERE object_id = ?", (object_id,)).fetchone()[0]
            if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor <= count:
                raise ValueError(f"object {object_id} has {count} steps: its cursor must be 0..{count}, got {cursor}")
            db.execute("UPDATE objects SET cursor = ? WHERE id = ?", (cursor, object_id))

    def undo(self, object_id: int, expected: int | None = None) -> int:
        cursor = max(self._cursor(object_id) - 1, 0)
        self.move_cursor(object_id, cursor, expected)
        return cursor

    def redo(self, object_id: int, expected: int | None = None) -> int:
        count = self._read("SELECT COUNT(*) FROM steps WHERE object_id = ?", (object_id,))[0][0]
        cursor = min(self._cursor(object_id) + 1, count)
        self.move_cursor(object_id, cursor, expected)
        return cursor

    def _cursor(self, object_id: int) -> int:
        rows = self._read("SELECT cursor FROM objects WHERE id = ?", (object_id,))
        if not rows:
            raise NotFound(f"no object {object_id} in project {self.path}")
        return rows[0][0]

    def update_object(self, object_id: int, label: str | None = None, color: str | None = None,
                      expected: int | None = None) -> None:
        """Rename and/or recolour an object."""
        image_id = self.object_image(object_id)
        with self._write(image_id, expected) as db:
            if label is not None:
                db.execute("UPDATE objects SET label = ? WHERE id = ?", (_text(label, "label"), object_id))
            if color is not None:
                db.execute("UPDATE objects SET color = ? WHERE id = ?", (_text(color, "color"), object_id))

    def delete_object(self, object_id: int, expected: int | None = None) -> None:
        image_id = self.object_image(object_id)
        with self._write(image_id, expected) as db:
            db.execute("DELETE FROM objects WHERE id = ?", (object_id,))

    def masks(self, image_id: int) -> list[tuple[dict, np.ndarray]]:
        """The image's objects that have a current mask, with that mask decoded (H x W bool), in order."""
        return [(o, coco_decode_rle(o["mask"])) for o in self.objects(image_id) if o["mask"] is not None]


# ---------------------------------------------------------------- opening
def _connect(path: Path) -> sqlite3.Connection:
    if path.is_dir():
        raise ProjectError(f"{path}: a folder, not a project file")
    if not path.parent.is_dir():
        raise ProjectError(f"{path}: its folder does not exist")
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA foreign_keys = ON")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable to a killed process; a power cut may lose the last
    except sqlite3.DatabaseError as exc:
        raise ProjectError(f"{path}: not a sam_mlx project (not an SQLite database: {exc})") from None
    if mode.lower() != "wal":
        db.close()
        raise ProjectError(f"{path}: cannot use the WAL journal (journal mode {mode}): a read-only folder?")
    return db


def _upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Check that ``db`` is a sam_mlx project (or empty) and migrate it to ``SCHEMA_VERSION``."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version > SCHEMA_VERSION:
                raise ProjectError(f"{path}: made by a newer sam_mlx (project schema {version}; this sam_mlx reads "
                                   f"up to {SCHEMA_VERSION}): upgrade sam_mlx to open it")
            if version == 0 and tables:
                raise ProjectError(f"{path}: an SQLite database but not a sam_mlx project "
                                   f"(tables {', '.join(sorted(tables)[:5])})")
            if version > 0:
                row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone() if "meta" in tables \
                    else None
                if row is None or row[0] != FORMAT:
                    raise ProjectError(f"{path}: an SQLite database but not a sam_mlx project (no project format)")
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](db)
                version += 1
                db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except sqlite3.DatabaseError as exc:
        raise ProjectError(f"{path}: not a sam_mlx project (corrupt or not an SQLite database: {exc})") from None


# ---------------------------------------------------------------- checking values
def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise ValueError(f"an object's {name} must be text of 1..200 characters, got {json.dumps(value)[:40]}")
    return value


def _index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"the chosen candidate must be an index >= 0, got {value!r}")
    return value


def _points(points: object) -> list[list[float]]:
    try:
        triples = np.asarray(points if points else np.zeros((0, 3)), dtype=np.float64).reshape(-1, 3)
    except (TypeError, ValueError):
        raise ValueError(f"points must be [[x, y, label], ...], got {json.dumps(points)[:60]}") from None
    if not np.isfinite(triples).all() or not np.isin(triples[:, 2], (0, 1)).all():
        raise ValueError(f"points must be [[x, y, label], ...] with labels 0 or 1, got {json.dumps(points)[:60]}")
    return [[float(x), float(y), int(label)] for x, y, label in triples]


def _box(box: object) -> str | None:
    if box is None:
        return None
    values = np.asarray(box, dtype=np.float64) if isinstance(box, (list, tuple)) else np.zeros(0)
    if values.shape != (4,) or not np.isfinite(values).all() or values[2] < values[0] or values[3] < values[1]:
        raise ValueError(f"box must be [x1, y1, x2, y2] with x1 <= x2, y1 <= y2, got {json.dumps(box)[:60]}")
    return json.dumps(values.tolist())
