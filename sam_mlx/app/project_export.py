"""Export a project's objects from their stored masks (no model): what the app's export and ``sam-mlx export`` write.

Both write the same files from the same project: the chosen formats (``sam_mlx.io.export``) for every image with
objects, with the project's clean-up applied, and per image a ``STEM.prompts.json`` the app can import again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write
from ..io.folders import output_stems
from ..io.images import load_image
from .masks import clean_mask
from .project import Project

PROMPTS_FORMAT = "sam_mlx_app_prompts"


def full_size(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask stored shrunk (the page shows large images' masks at most 4096 pixels a side) at the image's size,
    nearest pixels; a mask at the image's size as it is."""
    if mask.shape == (height, width):
        return mask
    rows = np.minimum((np.arange(height) + 0.5) * mask.shape[0] / height, mask.shape[0] - 1).astype(np.int64)
    cols = np.minimum((np.arange(width) + 0.5) * mask.shape[1] / width, mask.shape[1] - 1).astype(np.int64)
    return mask[rows][:, cols]


def chain(obj: dict) -> list[dict]:
    """The steps of an object's current mask: those up to its cursor since it was last cleared, as the page's
    ``.prompts.json`` gives them (points [[x, y, label], ...], box, multimask, selected)."""
    steps = []
    for step in reversed(obj["steps"][:obj["cursor"]]):
        if not step["points"] and not step["box"]:
            break
        steps.insert(0, {k: step[k] for k in ("points", "box", "multimask", "selected")})
    return steps


def export_project(project: Project, out_dir: str | Path, formats: list[str] | tuple[str, ...],
                   simplify: float | None = None,
                   log: Callable[[str], None] = lambda message: None) -> list[Path]:
    """Write every image's objects (those with a mask) into ``out_dir``; return the files written.

    ``simplify``: the polygons' tolerance in pixels (default: the project's clean-up setting, else the export's).
    Every image file is read (the cut-outs and overlays need its pixels) before the first file is written.
    """
    from ..io import export

    cleanup = project.cleanup()
    if simplify is None:
        simplify = export.DEFAULT_SIMPLIFY if cleanup["simplify"] is None else cleanup["simplify"]
    exporter = export.Exporter(out_dir, formats, simplify=simplify)
    records = project.images()
    stems = dict(zip((r["id"] for r in records), output_stems([Path(r["path"]) for r in records])))
    work = []
    for record in records:
        objects = project.masks(record["id"])
        if not objects:
            continue
        path = Path(record["path"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: image of project {project.path} not found (moved? open its new folder "
                                    "with `sam-mlx app --project` to find it by its pixels)")
        work.append((record, path, objects))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = json.loads(project.meta("model") or "{}")
    written: list[Path] = []
    for number, (record, path, objects) in enumerate(work, 1):
        image = load_image(path)
        height, width = image.shape[:2]
        if (width, height) != (record["width"], record["height"]):
            raise ValueError(f"{path}: the image is {width}x{height} but the project's was "
                             f"{record['width']}x{record['height']}: not the image that was labelled")
        exports, saved = [], []
        for obj, mask in objects:
            mask = clean_mask(full_size(mask, width, height), cleanup["fill_holes"], cleanup["remove_islands"])
            last = obj["steps"][obj["cursor"] - 1]
            prompt = {"points": [p[:2] for p in last["points"]] or None,
                      "labels": [p[2] for p in last["points"]] or None, "box": last["box"]}
            exports.append(export.ExportObject(mask=mask, label=obj["label"], score=last["score"],
                                               extra={"prompt": prompt}))
            saved.append({"label": obj["label"], "color": obj["color"], "steps": chain(obj)})
        stem = stems[record["id"]]
        written += exporter.add(path, image, exports, stem=stem)
        prompts = {"format": PROMPTS_FORMAT, "version": 1, "image": str(path), "width": width, "height": height,
                   **model, "cleanup": {**cleanup, "simplify": simplify}, "state": record["state"], "objects": saved}
        written.append(atomic_write(out_dir / f"{stem}.prompts.json",
                                    lambda tmp, r=prompts: Path(tmp).write_text(json.dumps(r, indent=1) + "\n"),
                                    suffix=".json"))
        log(f"[{number}/{len(work)}] {path.name}: {len(exports)} object{'s' * (len(exports) != 1)}")
    written += exporter.close()
    return written
