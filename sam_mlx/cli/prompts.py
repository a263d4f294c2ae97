"""Prompts of the ``segment`` command: points, labels and boxes from the command line or a prompts file (JSON, CSV)."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .messages import CliError


def _check_prompts(points: np.ndarray, boxes: np.ndarray, width: int, height: int, name: str) -> None:
    """Reject points outside the image and boxes that are inverted or outside it, before encoding."""
    for x, y in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise CliError(f"point {x:g},{y:g} is outside {name} ({width}x{height}: x in 0..{width}, y in 0..{height})")
    for x1, y1, x2, y2 in boxes:
        if x2 < x1 or y2 < y1:
            raise CliError(f"box {x1:g},{y1:g},{x2:g},{y2:g} has X2 < X1 or Y2 < Y1")
        if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
            raise CliError(f"box {x1:g},{y1:g},{x2:g},{y2:g} is outside {name} ({width}x{height})")


@dataclass
class Prompt:
    """One image's prompt: points N x 2 with labels N (1 foreground, 0 background) shared by each of the
    B x 4 boxes (every box is a prompt of its own; no box: one prompt of the points), and the object's label."""

    points: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    label: str | None = None

    def check(self, width: int, height: int, name: str) -> None:
        _check_prompts(self.points, self.boxes, width, height, name)

    def describe(self) -> dict:
        return {"points": self.points.tolist(), "labels": self.labels.tolist(), "boxes": self.boxes.tolist(),
                "label": self.label}


def _prompt(points, labels, boxes, label, where: str) -> Prompt:
    """A Prompt from lists of numbers, or a CliError naming ``where`` and what is wrong."""
    try:
        points = _rows(points, 2)
        boxes = _rows(boxes, 4)
        labels = np.array(labels if labels is not None else [1] * len(points), dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise CliError(f"{where}: points must be [x, y] pairs, boxes [x1, y1, x2, y2] and labels numbers") from None
    if not (np.isfinite(points).all() and np.isfinite(boxes).all()):
        raise CliError(f"{where}: coordinates must be finite numbers")
    if len(labels) != len(points) or not np.isin(labels, (0, 1)).all():
        raise CliError(f"{where}: labels must be 1 (foreground) or 0 (background), one per point "
                       f"({len(points)} points, {len(labels)} labels)")
    if not len(points) and not len(boxes):
        raise CliError(f"{where}: no prompt (give points or boxes)")
    if label is not None and not isinstance(label, str):
        raise CliError(f"{where}: label must be a text, got {label!r}")
    return Prompt(points, labels.astype(np.int32), boxes, label or None)


def _rows(values, width: int) -> np.ndarray:
    """A list of ``width``-number lists as an N x width float array (ValueError for any other shape)."""
    rows = np.array(values if values is not None else [], dtype=np.float64)
    if rows.size and (rows.ndim != 2 or rows.shape[1] != width):
        raise ValueError(f"expected rows of {width} numbers, got shape {rows.shape}")
    return rows.reshape(-1, width)


_PROMPT_KEYS = ("image", "points", "labels", "boxes", "label")


def read_prompts(path: str | Path) -> list[tuple[Path, list[Prompt]]]:
    """A prompts file -> [(image path, its prompts)], images in order of first mention.

    JSON: a list of ``{"image": path, "points": [[x, y], ...], "labels": [1, 0, ...], "boxes": [[x1, y1,
    x2, y2], ...], "label": name}`` (labels default to 1, i.e. foreground; points or boxes may be left out).
    CSV: a header row with those columns; a cell holds its numbers separated by commas, spaces or ";"
    (``"250,400; 700,100"``). Image paths are relative to the prompts file's folder. Each entry or row is
    one prompt; an image may have several (several objects).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CliError(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    entries = _csv_prompts(path, text) if path.suffix.lower() == ".csv" else _json_prompts(path, text)
    jobs: dict[Path, list[Prompt]] = {}
    for where, entry in entries:
        unknown = sorted(set(entry) - set(_PROMPT_KEYS))
        if unknown:
            raise CliError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(_PROMPT_KEYS)})")
        if not isinstance(entry.get("image"), str) or not entry["image"]:
            raise CliError(f"{where}: no image")
        image = Path(os.path.abspath(path.parent / Path(entry["image"]).expanduser()))
        boxes = entry.get("boxes")
        jobs.setdefault(image, []).append(_prompt(entry.get("points"), entry.get("labels"), boxes, entry.get("label"),
                                                  where))
    if not jobs:
        raise CliError(f"{path}: no prompts in the file")
    return list(jobs.items())


def _json_prompts(path: Path, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise CliError(f"{path}: expected a JSON list of prompt objects ({{\"image\": ..., \"points\": ...}})")
    return [(f"{path}: entry {i}", entry) for i, entry in enumerate(data, 1)]


def _csv_prompts(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = list(csv.DictReader(text.splitlines()))
    columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    if "image" not in columns:
        raise CliError(f"{path}: the CSV needs a header row with an image column (columns: {', '.join(_PROMPT_KEYS)})")
    entries = []
    for n, row in enumerate(rows, 2):
        where = f"{path}: row {n}"
        cells = {key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
        entry: dict = {key: value for key, value in cells.items() if value}
        for key, size in (("points", 2), ("boxes", 4), ("labels", 1)):
            if key in entry:
                entry[key] = _cell_numbers(entry[key], size, f"{where}, column {key}")
        entries.append((where, entry))
    return entries


def _cell_numbers(text: str, size: int, where: str) -> list:
    parts = [p for p in re.split(r"[\s,;]+", text) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise CliError(f"{where}: {text!r} is not a list of numbers") from None
    if len(values) % size:
        raise CliError(f"{where}: {len(values)} numbers, expected a multiple of {size}")
    return values if size == 1 else [values[i:i + size] for i in range(0, len(values), size)]
