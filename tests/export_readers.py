"""How the export formats' consumers read them (pycocotools, labelme, ultralytics), shared by the export tests."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools.coco import COCO


def coco_masks(path: Path) -> tuple[COCO, dict[int, np.ndarray]]:
    """pycocotools' COCO of the file and its annotations' masks by annotation id."""
    coco = COCO(str(path))
    return coco, {ann_id: coco.annToMask(ann).astype(bool) for ann_id, ann in coco.anns.items()}


def labelme_masks(path: Path) -> tuple[dict, dict[tuple[str, int], np.ndarray]]:
    """The LabelMe document, checked as labelme's loader checks it, and its instances' masks."""
    document = json.loads(path.read_text())
    assert {"version", "flags", "shapes", "imagePath", "imageData", "imageHeight", "imageWidth"} <= set(document)
    height, width = document["imageHeight"], document["imageWidth"]
    instances: dict[tuple[str, int], np.ndarray] = {}
    for shape in document["shapes"]:
        assert isinstance(shape["label"], str) and shape["shape_type"] == "polygon"
        assert isinstance(shape["group_id"], int) and isinstance(shape["description"], str)
        assert isinstance(shape["flags"], dict) and shape["mask"] is None
        points = shape["points"]
        assert len(points) > 2 and all(len(p) == 2 and all(isinstance(v, (int, float)) for v in p) for p in points)
        drawn = Image.new("L", (width, height))
        ImageDraw.Draw(drawn).polygon([tuple(p) for p in points], outline=1, fill=1)  # labelme's shape_to_mask
        key = (shape["label"], shape["group_id"])
        instances[key] = instances.get(key, np.zeros((height, width), bool)) | np.asarray(drawn, bool)
    return document, instances


def yolo_masks(path: Path, width: int, height: int) -> list[tuple[int, np.ndarray]]:
    """(class, mask) per line, rasterised as ultralytics does."""
    objects = []
    for line in path.read_text().splitlines():
        values = line.split()
        cls, coords = int(values[0]), np.array(values[1:], dtype=np.float64).reshape(-1, 2)
        assert len(coords) >= 3 and (coords >= 0).all() and (coords <= 1).all()
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [(coords * (width, height)).astype(np.int32)], 1)
        objects.append((cls, mask.astype(bool)))
    return objects


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))
