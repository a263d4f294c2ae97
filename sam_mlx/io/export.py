"""Masks as files other tools read: mask PNGs, cut-outs, COCO, YOLO and LabelMe.

The export API of the ``sam-mlx`` command and the local app::

    exporter = Exporter(out_dir, ["png", "coco"], simplify=DEFAULT_SIMPLIFY, best_only=False)
    exporter.add(image_path, image, [ExportObject(mask, label="dog", score=0.97)])  # per image
    exporter.close()                                                                 # run-level files

``add`` writes an image's files and returns their paths; ``close`` writes the files that
cover the whole run (COCO, the YOLO classes) and returns theirs. Every file is written
atomically (``checkpoint.atomic_write``). A run spread over processes (Ray workers) calls ``write`` in
the workers, which returns the image's share of the run-level files as an ``ImageEntry``, and
``add_entry`` with those in the process that calls ``close``. Beyond the contract's names: ``ExportObject.group``,
``Exporter(labels=...)`` (categories known up front), ``add(file_name=...)`` (COCO's file name),
``Exporter.selected`` (what ``best_only`` keeps), ``Exporter.object_files`` (a mask's PNG names),
``parse_formats``, ``require_opencv`` and the polygon functions ``mask_polygons``, ``hole_free_pieces``,
``piece_outline``, ``piece_boundary`` and ``bridged``. The files, in ``out_dir``:

  png       ``{stem}_mask{i}.png``     0/255 mask; ``i`` is the object's index in ``add``'s list
  cutout    ``{stem}_cutout{i}.png``   RGBA: the image with the mask as alpha (background removed: transparent
                                       pixels are black, and PNG's fastest compression level is used)
  coco      ``coco.json``              one COCO instances file for the run, polygon segmentation
  coco-rle  ``coco_rle.json``          the same with compressed RLE segmentation
  yolo      ``yolo/{stem}.txt``        YOLO segmentation labels, one line per object:
                                       ``class x1 y1 x2 y2 ...`` normalised to 0..1;
            ``yolo/classes.txt``       the class names, one a line, when any object has a label
  labelme   ``labelme/{stem}.json``    LabelMe polygons (read by labelme and X-AnyLabeling), one
                                       shape per polygon, an object's shapes sharing a ``group_id``

An object's ``label`` (default ``"object"``) is its COCO category, YOLO class and LabelMe label;
categories and classes are numbered in order of first appearance (``labels`` given up front
come first), so an unlabelled run is class 0 / category 1 throughout. COCO annotations hold
``area`` (pixels), ``bbox`` (x, y, w, h with w = x2 - x1 + 1 over the mask's pixels, COCO's
convention), ``score`` and ``predicted_iou`` (SAM's predicted IoU), ``stability_score`` and the
object's ``extra`` items; empty masks are left out of the COCO, YOLO and LabelMe files (they
have no polygon). ``best_only`` keeps, of each group of objects (``ExportObject.group``: SAM's
candidates for one prompt), the top-scoring one; objects without a group form one group.

Polygons are traced by OpenCV's ``findContours`` (the ``sam-mlx[export]`` extra, imported only
when a polygon format is asked for). A mask is cut into parts without holes, whose union is the
mask: its 8-connected parts, and a part with a hole is cut along a pixel column through the
hole, again until none has one; each piece is one polygon (COCO, LabelMe) or, for YOLO, whose
lines are one polygon per object, the pieces are joined by zero-width bridges into one. Each
format gets the vertices its readers rasterise back to the mask's pixels exactly:

- COCO: the outline of the mask's pixel squares (pixel (x, y) is the square [x, x+1] x [y, y+1];
  pycocotools fills the pixels whose centres are inside);
- LabelMe and YOLO: the centres of the boundary pixels, as OpenCV traces them (labelme fills a
  polygon together with its outline, PIL's ``polygon(outline=1, fill=1)``, and ultralytics with
  ``cv2.fillPoly``, which includes the edges). A one-pixel part is its point repeated 3 times.
  YOLO coordinates are rounded up to 6 decimals past a 0.01-pixel margin, so that readers that
  truncate them to pixels (ultralytics) and readers that round them get the same pixel.

``simplify`` is the Douglas-Peucker tolerance (``cv2.approxPolyDP``) in pixels; 0 keeps every
corner (exact). The default, ``DEFAULT_SIMPLIFY`` = 0.5 pixel, drops the vertices that lie within
half a pixel of a straight edge: on the shared photos' masks the COCO polygons still rasterise back
exactly and LabelMe's at IoU >= 0.98 (``tests/test_export.py``); YOLO's bridges add the pixels they
cross.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..amg.mask_utils import batched_mask_to_box, coco_encode_rle, mask_to_rle
from .atomic import atomic_write

FORMATS: tuple[str, ...] = ("png", "cutout", "coco", "coco-rle", "yolo", "labelme")
DEFAULT_SIMPLIFY: float = 0.5
DEFAULT_LABEL = "object"
POLYGON_FORMATS = ("coco", "yolo", "labelme")
COCO_FILES = {"coco": "coco.json", "coco-rle": "coco_rle.json"}
LABELME_VERSION = "5.5.0"  # the LabelMe file format these files follow
_COCO_KEYS = {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd", "score",
              "predicted_iou", "stability_score"}
_YOLO_DECIMALS = 6
_TREE_VERTICES = 4000  # YOLO's bridges: the shortest tree up to this many vertices, a chain beyond


@dataclass
class ExportObject:
    """One mask to export. ``mask``: H x W bool at the image's size."""

    mask: np.ndarray
    label: str | None = None  # object/category name; None -> DEFAULT_LABEL
    score: float | None = None  # SAM's predicted IoU
    stability_score: float | None = None
    extra: dict | None = None  # e.g. the prompt, carried into COCO annotations and LabelMe shapes
    group: int | None = None  # objects of one prompt share a group (best_only keeps each group's best)


@dataclass
class ImageEntry:
    """An image's share of the run-level files (picklable): COCO's image and its annotations without ids, per
    COCO format, and the labels of the objects the files show, in order (they number categories and classes)."""

    file_name: str
    width: int
    height: int
    labels: list[str | None]
    annotations: dict[str, list[dict]]


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,coco"`` or ``["png", "coco"]`` -> ``("png", "coco")``: known names, no duplicates, at least one."""
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [name.strip().lower() for name in names if name.strip()]
    unknown = [name for name in names if name not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format {unknown[0]!r} (choose from {', '.join(FORMATS)})")
    if not names:
        raise ValueError(f"no export format given (choose from {', '.join(FORMATS)})")
    return tuple(dict.fromkeys(names))


def require_opencv():
    """OpenCV's ``cv2``, or an ImportError saying how to install it."""
    try:
        import cv2
    except ImportError as exc:
        raise ImportError(
            f"the {'/'.join(POLYGON_FORMATS)} exports trace polygons with OpenCV, which is not installed "
            f"({exc}): pip install 'sam-mlx[export]' (or opencv-python-headless)"
        ) from None
    return cv2


# ---------------------------------------------------------------- polygons
def hole_free_pieces(mask: np.ndarray) -> Iterator[tuple[np.ndarray, int, int]]:
    """The mask as pieces without holes whose union is the mask: ``(piece, x0, y0)``, piece cropped at x0, y0.

    8-connected parts (OpenCV's contour connectivity); a part with a hole is cut along the pixel column
    through the middle of the hole's bounding box, and the halves are split again until no piece has a hole.
    """
    cv2 = require_opencv()
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return
    x1, y1, x2, y2 = (int(v) for v in batched_mask_to_box(mask))  # labelling only the mask's box is cheaper
    queue = [(np.ascontiguousarray(mask[y1:y2 + 1, x1:x2 + 1], dtype=np.uint8), x1, y1)]
    while queue:
        region, x0, y0 = queue.pop(0)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
        for k in range(1, count):
            x, y, w, h = (int(v) for v in stats[k, :4])
            part = (labels[y:y + h, x:x + w] == k).astype(np.uint8)
            cut = _hole_column(cv2, part)
            if cut is None:
                yield part.astype(bool), x0 + x, y0 + y
            else:
                queue += [(part[:, :cut], x0 + x, y0 + y), (part[:, cut:], x0 + x + cut, y0 + y)]


def _hole_column(cv2, part: np.ndarray) -> int | None:
    """A column of ``part`` (one 8-connected part, uint8) that crosses one of its holes, or None without holes.

    A hole's contour runs over the part's pixels around it, so the hole's own pixels lie strictly
    inside the contour's columns; the middle column cuts the hole open on both sides.
    """
    contours, hierarchy = cv2.findContours(np.pad(part, 1), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    for contour, (_, _, _, parent) in zip(contours, hierarchy[0]):
        if parent != -1:
            x, _, w, _ = cv2.boundingRect(contour)
            return x - 1 + w // 2
    return None


def _simplified(cv2, points: np.ndarray, simplify: float) -> np.ndarray:
    """Douglas-Peucker with tolerance ``simplify`` (0: only collinear points go), never below 3 vertices."""
    reduced = cv2.approxPolyDP(points.reshape(-1, 1, 2).astype(np.int32), simplify, True).reshape(-1, 2)
    return reduced if len(reduced) >= 3 else points


def piece_outline(piece: np.ndarray, simplify: float = 0.0) -> np.ndarray:
    """K x 2 int (x, y) corners of the pixel squares' outline of a hole-free 8-connected piece (COCO's polygon).

    Traced on the piece upsampled 2x: there the boundary pixels' indices u map to the corners
    ceil(u / 2) of the original pixels (a left/top boundary pixel 2x -> x, a right/bottom one 2x+1 -> x+1).
    """
    cv2 = require_opencv()
    doubled = np.pad(np.repeat(np.repeat(piece.astype(np.uint8), 2, axis=0), 2, axis=1), 1)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    corners = contours[0].reshape(-1, 2) // 2  # index u in the padded array: ceil((u - 1) / 2) = u // 2
    corners = corners[np.any(corners != np.roll(corners, 1, axis=0), axis=1)]
    return _simplified(cv2, corners, simplify)


def piece_boundary(piece: np.ndarray, simplify: float = 0.0) -> np.ndarray:
    """K x 2 int (x, y) boundary pixel centres of a hole-free 8-connected piece (LabelMe's and YOLO's polygon).

    At least 3 vertices: a one-pixel piece is its pixel 3 times, a one-pixel-wide line comes back on itself.
    """
    cv2 = require_opencv()
    contours, _ = cv2.findContours(np.pad(piece.astype(np.uint8), 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    points = contours[0].reshape(-1, 2) - 1
    if len(points) >= 3:
        points = _simplified(cv2, points, simplify)
    return np.concatenate([points, points[:1].repeat(3 - len(points), axis=0)]) if len(points) < 3 else points


def mask_polygons(mask: np.ndarray, simplify: float = DEFAULT_SIMPLIFY, outline: bool = True) -> list[np.ndarray]:
    """Polygons (K x 2 int arrays of x, y) whose union is the H x W bool mask, one per hole-free piece.

    ``outline=True``: the outline of the pixel squares (COCO); False: the boundary pixel centres (LabelMe, YOLO).
    """
    trace = piece_outline if outline else piece_boundary
    return [trace(piece, simplify) + (x0, y0) for piece, x0, y0 in hole_free_pieces(mask)]


def bridged(polygons: Sequence[np.ndarray]) -> np.ndarray:
    """One polygon from several, joined by short bridges.

    Each further polygon is entered from a vertex of one already joined, walked round, and left by the same
    bridge, so a bridge encloses no area: even-odd and non-zero fills see each polygon as before, plus the
    bridge's own pixels where a rasteriser draws edges. The bridges are the shortest tree between the vertices
    (Prim's), or, past ``_TREE_VERTICES`` vertices (a cost of their square), a chain in reading order.
    """
    if len(polygons) == 1:
        return polygons[0]
    points = np.concatenate(polygons).astype(np.int64)
    first = np.concatenate([[0], np.cumsum([len(p) for p in polygons])[:-1]])
    root, bridges = (_shortest_tree if len(points) <= _TREE_VERTICES else _reading_chain)(polygons, points, first)
    values: list[int] = []  # the path as a linked list: values[node], and the node after it
    after: list[int] = []
    node_of: dict[int, int] = {}  # a vertex's first node

    def splice(node: int, vertices: Sequence[int]) -> None:
        for vertex in vertices:
            values.append(int(vertex))
            after.append(after[node] if node >= 0 else -1)
            if node >= 0:
                after[node] = len(values) - 1
            node = len(values) - 1
            node_of.setdefault(int(vertex), node)

    def walk(piece: int, start: int) -> list[int]:
        size = len(polygons[piece])
        return [first[piece] + (start - first[piece] + k) % size for k in range(size)]

    splice(-1, walk(root, first[root]))
    for piece, entry, anchor in bridges:  # each anchor is on a polygon joined before
        splice(node_of[anchor], [*walk(piece, entry), entry, anchor])
    path, node = [], 0
    while node != -1:
        path.append(values[node])
        node = after[node]
    return points[path]


def _shortest_tree(polygons, points: np.ndarray, first: np.ndarray) -> tuple[int, list[tuple[int, int, int]]]:
    """Prim's tree over the polygons by their closest vertices: (root, [(polygon, entry vertex, anchor vertex)])."""
    owner = np.repeat(np.arange(len(polygons)), [len(p) for p in polygons])
    nearest = np.full(len(points), np.inf)  # squared distance to the joined polygons' vertices ...
    anchor = np.zeros(len(points), dtype=np.int64)  # ... and which vertex that is
    joined = np.zeros(len(polygons), dtype=bool)

    def join(piece: int) -> None:
        joined[piece] = True
        members = np.flatnonzero(owner == piece)
        distances = ((points[:, None, :] - points[None, members, :]) ** 2).sum(-1)
        closer = distances.min(axis=1) < nearest
        nearest[closer] = distances.min(axis=1)[closer]
        anchor[closer] = members[distances.argmin(axis=1)[closer]]

    join(0)
    bridges = []
    for _ in range(len(polygons) - 1):
        entry = int(np.argmin(np.where(joined[owner], np.inf, nearest)))
        bridges.append((int(owner[entry]), entry, int(anchor[entry])))
        join(int(owner[entry]))
    return 0, bridges


def _reading_chain(polygons, points: np.ndarray, first: np.ndarray) -> tuple[int, list[tuple[int, int, int]]]:
    """The polygons in reading order (bands of 16 rows, then x), each bridged to the one before at their closest
    vertices: (root, [(polygon, entry vertex, anchor vertex)])."""
    tops = [(int(p[:, 1].min()) // 16, int(p[:, 0].min())) for p in polygons]
    order = sorted(range(len(polygons)), key=tops.__getitem__)
    bridges = []
    for before, piece in zip(order, order[1:]):
        distances = ((polygons[before][:, None, :] - polygons[piece][None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(distances), distances.shape)
        bridges.append((piece, int(first[piece] + j), int(first[before] + i)))
    return order[0], bridges


# ---------------------------------------------------------------- the exporter
class Exporter:
    """Writes the chosen formats for a run of one or more images into out_dir, atomically.

    Per-image files are written by ``add()``; run-level files (COCO, YOLO classes) by ``close()``.
    """

    def __init__(self, out_dir: str | Path, formats: str | Sequence[str], simplify: float = DEFAULT_SIMPLIFY,
                 best_only: bool = False, labels: Sequence[str] = ()):
        self.out_dir = Path(out_dir)
        self.formats = parse_formats(formats)
        if not (isinstance(simplify, (int, float)) and math.isfinite(simplify) and simplify >= 0):
            raise ValueError(f"simplify must be a number of pixels >= 0, got {simplify!r}")
        self.simplify = float(simplify)
        self.best_only = best_only
        if any(name in POLYGON_FORMATS for name in self.formats):
            require_opencv()  # fail before any work, not at the first polygon
        self.categories: dict[str, int] = {}  # label -> 0-based index: YOLO class, COCO category id - 1
        self.labelled = False  # any object (or ``labels``) named: YOLO gets a classes file
        for label in labels:
            self._category(label)
        self._coco_images: list[dict] = []
        self._coco_annotations: dict[str, list[dict]] = {name: [] for name in COCO_FILES if name in self.formats}

    def add(self, image_path: str | Path, image: np.ndarray, objects: Sequence[ExportObject],
            stem: str | None = None, file_name: str | None = None) -> list[Path]:
        """Write the per-image files of ``objects`` on ``image`` (H x W x 3 uint8 RGB); return their paths.

        ``stem`` names the files (default: the image's stem); ``file_name`` is the image's COCO
        ``file_name`` (default: its file name; the command gives the path below the input folder).
        """
        written, entry = self.write(image_path, image, objects, stem, file_name)
        self.add_entry(entry)
        return written

    def write(self, image_path: str | Path, image: np.ndarray, objects: Sequence[ExportObject],
              stem: str | None = None, file_name: str | None = None) -> tuple[list[Path], ImageEntry]:
        """``add``'s files, without keeping the image's share of the run-level files: that is returned, for
        ``add_entry`` here or in the process that writes them (``close``)."""
        image_path = Path(image_path)
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{image_path}: image must be H x W x 3 uint8 RGB, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        for i, obj in enumerate(objects):
            if np.shape(obj.mask) != (height, width):
                raise ValueError(f"{image_path}: mask {i} has shape {np.shape(obj.mask)}, "
                                 f"the image is {height}x{width}")
        stem = stem or image_path.stem
        chosen = self.selected(objects)
        written: list[Path] = []
        for i in chosen:
            alpha = np.asarray(objects[i].mask, dtype=np.uint8) * 255
            files = self.object_files(stem, i)
            if "png" in files:
                written.append(self._png(Image.fromarray(alpha), files["png"]))
            if "cutout" in files:  # transparent pixels black: ~3x smaller and faster to compress than the photo
                rgba = np.dstack([image * objects[i].mask[..., None].astype(np.uint8), alpha])
                written.append(self._png(Image.fromarray(rgba, "RGBA"), files["cutout"], compress_level=1))
        kept = [(i, objects[i]) for i in chosen if np.any(objects[i].mask)]
        centres = {i: mask_polygons(obj.mask, self.simplify, outline=False) for i, obj in kept} \
            if {"yolo", "labelme"} & set(self.formats) else {}
        if "yolo" in self.formats:
            lines = [self._yolo_line(obj, centres[i], width, height) for i, obj in kept]
            written.append(self._text("".join(lines), Path("yolo") / f"{stem}.txt"))
        if "labelme" in self.formats:
            written.append(self._labelme(image_path, stem, width, height, kept, centres))
        return written, self.entry(file_name or image_path.name, width, height, objects)

    def entry(self, file_name: str, width: int, height: int, objects: Sequence[ExportObject]) -> ImageEntry:
        """The image's share of the run-level files (``write`` returns it; a resumed run makes it again for
        an image whose files a run before wrote)."""
        kept = [(i, objects[i]) for i in self.selected(objects) if np.any(objects[i].mask)]
        annotations: dict[str, list[dict]] = {name: [] for name in self._coco_annotations}
        for name, entries in annotations.items():
            for _, obj in kept:
                mask = np.asarray(obj.mask, dtype=bool)
                x1, y1, x2, y2 = (int(v) for v in batched_mask_to_box(mask))
                if name == "coco":
                    segmentation = [polygon.reshape(-1).tolist()
                                    for polygon in mask_polygons(mask, self.simplify, outline=True)]
                else:
                    segmentation = coco_encode_rle(mask_to_rle(mask[None])[0])
                annotation = {
                    "segmentation": segmentation, "area": int(mask.sum()), "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1],
                    "iscrowd": 0, "score": obj.score, "predicted_iou": obj.score,
                    "stability_score": obj.stability_score,
                }
                entries.append({**annotation, **_extra(obj, _COCO_KEYS)})
        return ImageEntry(file_name, width, height, [obj.label for _, obj in kept], annotations)

    def add_entry(self, entry: ImageEntry) -> None:
        """Keep an image's share of the run-level files; images are numbered in the order of these calls."""
        for label in entry.labels:
            self._category(label)
        if not self._coco_annotations:
            return
        image_id = len(self._coco_images) + 1
        self._coco_images.append({"id": image_id, "file_name": entry.file_name, "width": entry.width,
                                  "height": entry.height})
        for name, entries in self._coco_annotations.items():
            for label, annotation in zip(entry.labels, entry.annotations[name]):
                entries.append({"id": len(entries) + 1, "image_id": image_id,
                                "category_id": self._category(label) + 1, **annotation})

    def close(self) -> list[Path]:
        """Write the run-level files: the COCO file(s) and, with labels, YOLO's classes.txt; return their paths."""
        written = []
        categories = [{"id": index + 1, "name": label, "supercategory": ""} for label, index in self.categories.items()]
        for name, entries in self._coco_annotations.items():
            dataset = {
                "info": {"description": "masks by sam_mlx (Segment Anything in MLX)",
                         "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                "licenses": [], "images": self._coco_images, "annotations": entries, "categories": categories,
            }
            written.append(self._text(_json(dataset), Path(COCO_FILES[name])))
        if "yolo" in self.formats and self.labelled:
            written.append(self._text("".join(f"{label}\n" for label in self.categories), Path("yolo/classes.txt")))
        return written

    def object_files(self, stem: str, index: int) -> dict[str, str]:
        """The names, in out_dir, of the files of one object of ``add``'s list: {"png": ..., "cutout": ...}
        for those of the two formats that are chosen."""
        names = {"png": f"{stem}_mask{index}.png", "cutout": f"{stem}_cutout{index}.png"}
        return {kind: name for kind, name in names.items() if kind in self.formats}

    def selected(self, objects: Sequence[ExportObject]) -> list[int]:
        """Indices of the objects ``add`` exports: all, or with ``best_only`` each group's top-scoring one."""
        if not self.best_only:
            return list(range(len(objects)))
        best: dict[int | None, int] = {}
        for i, obj in enumerate(objects):
            current = best.get(obj.group)
            if current is None or _score(obj) > _score(objects[current]):
                best[obj.group] = i
        return sorted(best.values())

    # ------------------------------------------------------------ helpers
    def _category(self, label: str | None) -> int:
        if label is not None:
            self.labelled = True
        name = DEFAULT_LABEL if label is None else str(label)
        return self.categories.setdefault(name, len(self.categories))

    def _png(self, picture: Image.Image, name: str, compress_level: int = 6) -> Path:
        def save(tmp: str) -> None:
            picture.save(tmp, format="PNG", compress_level=compress_level)

        return atomic_write(self.out_dir / name, save, suffix=".png")

    def _text(self, text: str, relative: Path) -> Path:
        path = self.out_dir / relative
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), suffix=path.suffix)

    def _yolo_line(self, obj: ExportObject, polygons: list[np.ndarray], width: int, height: int) -> str:
        polygon = bridged(polygons).astype(np.float64)
        scale = 10.0**_YOLO_DECIMALS
        normalised = np.ceil((polygon + 0.01) / (width, height) * scale) / scale
        numbers = " ".join(f"{v:.{_YOLO_DECIMALS}f}" for v in np.minimum(normalised, 1.0).reshape(-1))
        return f"{self._category(obj.label)} {numbers}\n"

    def _labelme(self, image_path: Path, stem: str, width: int, height: int,
                 kept: list[tuple[int, ExportObject]], centres: dict[int, list[np.ndarray]]) -> Path:
        folder = self.out_dir / "labelme"
        try:  # labelme opens imagePath relative to the JSON file's folder
            image_ref = Path(os.path.relpath(image_path.resolve(), folder.resolve())).as_posix()
        except ValueError:  # another drive (Windows)
            image_ref = image_path.resolve().as_posix()
        shapes = []
        for i, obj in kept:
            self._category(obj.label)
            for polygon in centres[i]:
                shape = {"label": DEFAULT_LABEL if obj.label is None else str(obj.label),
                         "points": polygon.tolist(), "group_id": i, "description": "", "shape_type": "polygon",
                         "flags": {}, "mask": None}
                if obj.score is not None:
                    shape["score"] = obj.score  # X-AnyLabeling shows it
                shapes.append({**shape, **_extra(obj, set(shape))})
        document = {"version": LABELME_VERSION, "flags": {}, "shapes": shapes, "imagePath": image_ref,
                    "imageData": None, "imageHeight": height, "imageWidth": width}
        return self._text(_json(document, indent=1), Path("labelme") / f"{stem}.json")


def _score(obj: ExportObject) -> float:
    return -math.inf if obj.score is None else float(obj.score)


def _extra(obj: ExportObject, reserved: set[str]) -> dict:
    """The object's extra items, refused if one would overwrite a field of the format."""
    extra = obj.extra or {}
    clash = sorted(reserved & set(extra))
    if clash:
        raise ValueError(f"ExportObject.extra key {clash[0]!r} is a field of the export format: rename it")
    return extra


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON numbers and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json(data: dict, indent: int | None = None) -> str:
    return json.dumps(data, default=_plain, indent=indent, separators=None if indent else (",", ":"),
                      allow_nan=False) + "\n"  # strict JSON: a NaN score is an error, never a bare NaN
