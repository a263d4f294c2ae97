"""An image's output files, written atomically as one set that replaces the last run's, and the temporaries
that killed writers left, removed."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from ..io.atomic import atomic_write, locked_folder, one_set_of_files, remove_abandoned_temporaries

_REPORT_KEYS = {"png": "file", "cutout": "cutout"}  # a mask's files in segment's JSON report


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def _write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(_json_text(data)), suffix=".json")


def _json_text(data: dict) -> str:
    return json.dumps(_strict_json(data), indent=1, allow_nan=False) + "\n"


def _strict_json(value: object) -> object:
    """``value`` with non-finite floats as null: bare NaN and Infinity are not JSON, and strict parsers refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


@contextlib.contextmanager
def _replacing_outputs(out_dir: Path, stem: str) -> Iterator[None]:
    """Write an image's outputs (exports, overlay, ``{stem}.json``) in this block as one set replacing the last one.

    Every file goes to a temporary first and all are renamed into place only when the block succeeds, so a
    failed run (a full disk) leaves the previous set whole; then the per-mask files the previous run's own
    JSON listed and the new one does not are deleted, and no other file. Runs writing into one folder at
    once take turns on a lock of the folder, so each set on disk is one run's.
    """
    json_path = out_dir / f"{stem}.json"
    with locked_folder(out_dir):
        previous = _files_listed(json_path, stem)
        remove_abandoned_temporaries(out_dir, rf"{re.escape(stem)}(_(mask|cutout)\d+\.png|_overlay\.png|\.json)")
        with one_set_of_files():
            yield
        for name in previous - _files_listed(json_path, stem):
            (out_dir / name).unlink(missing_ok=True)


def _files_listed(json_path: Path, stem: str) -> set[str]:
    """The per-mask PNGs (masks, cut-outs) an image's JSON report lists; none if there is no report of ours."""
    try:
        report = json.loads(json_path.read_text())
        names = [m.get(key) for m in report.get("masks", []) for key in _REPORT_KEYS.values()]
        names += report.get("exports", [])
    except (OSError, ValueError, TypeError, AttributeError):
        return set()
    ours = re.compile(rf"{re.escape(stem)}_(mask|cutout)\d+\.png")
    return {name for name in names if isinstance(name, str) and ours.fullmatch(name)}


_OUTPUT_NAMES = {".": r".+\.(json|png|safetensors)", "yolo": r".+\.txt", "labelme": r".+\.json"}  # by folder


def _remove_temporaries(out_dir: Path) -> None:
    """Remove the temporaries that writers of outputs left when they were killed (a Ray worker, a run)."""
    for folder, names in _OUTPUT_NAMES.items():
        if (out_dir / folder).is_dir():
            remove_abandoned_temporaries(out_dir / folder, names)
