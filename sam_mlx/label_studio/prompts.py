"""What a Label Studio user clicked: the ``context.result`` of an interactive request, read as a SAM prompt.

Label Studio sends the regions of the smart tools in percent of the image: ``keypointlabels`` (``value.x``,
``value.y``; ``is_positive`` false for an Alt-click) and ``rectanglelabels`` (``x``, ``y``, ``width``, ``height``,
``rotation`` in degrees, clockwise about the top-left corner). A keypoint is negative when ``is_positive`` is false
or its label is one of ``negative_labels``. Pixels are percent / 100 x the image's width or height (the edges of the
image are 0 and width), as SAM's predictor takes them; a rotated rectangle gives SAM its axis-aligned bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..app.limits import MAX_POINTS
from .config import LabelConfig

NEGATIVE_LABELS = ("negative", "background")


@dataclass(frozen=True)
class Click:
    """One interactive request: points (percent x, y and a 1/0 label), an optional rectangle (percent x, y, width,
    height and degrees of rotation), the image tag they were made on and the label the mask gets (None: the brush
    tag's first label)."""

    image_name: str
    points: tuple[tuple[float, float, int], ...]
    rectangle: tuple[float, float, float, float, float] | None
    label: str | None

    def in_pixels(self, width: int, height: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """(points N x 2, labels N, box 4) in the image's pixels, None where absent."""
        scale = np.array([width, height]) / 100.0
        points = labels = box = None
        if self.points:
            values = np.array(self.points, dtype=np.float64)
            points, labels = values[:, :2] * scale, values[:, 2].astype(np.int64)
        if self.rectangle is not None:
            x, y, w, h, rotation = self.rectangle
            angle = math.radians(rotation)
            turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            corners = (np.array([[0, 0], [w, 0], [0, h], [w, h]]) * scale) @ turn.T + np.array([x, y]) * scale
            box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
        return points, labels, box


def parse_click(context: dict, config: LabelConfig, negative_labels: tuple[str, ...] = NEGATIVE_LABELS) -> Click:
    """``context`` of a ``/predict`` request -> Click; ValueError names the region or field that is wrong."""
    regions = context.get("result")
    if not isinstance(regions, list) or not regions:
        raise ValueError("context.result must be a non-empty list of keypointlabels / rectanglelabels regions")
    negatives = {name.lower() for name in negative_labels}
    points: list[tuple[float, float, int]] = []
    rectangle = label = image_name = None
    for number, region in enumerate(regions):
        where = f"context.result[{number}]"
        if not isinstance(region, dict) or not isinstance(region.get("value"), dict):
            raise ValueError(f"{where} must be a region object with a 'value' object")
        kind, value = region.get("type"), region["value"]
        if kind not in ("keypointlabels", "rectanglelabels"):
            continue  # other regions (e.g. the brush masks already made) are not prompts
        to_name = region.get("to_name")
        if to_name not in config.images:
            raise ValueError(f"{where}: to_name {to_name!r} is not an image of the labelling config "
                             f"({', '.join(config.images)})")
        if image_name not in (None, to_name):
            raise ValueError(f"{where}: regions on two images ({image_name!r}, {to_name!r}) in one request")
        image_name = to_name
        labels = value.get(kind) or value.get("labels") or []
        chosen = labels[0] if isinstance(labels, list) and labels and isinstance(labels[0], str) else None
        x, y = _percent(value, "x", where), _percent(value, "y", where)
        if kind == "keypointlabels":
            positive = region.get("is_positive", True) is not False and (chosen or "").lower() not in negatives
            points.append((x, y, int(positive)))
        else:
            if rectangle is not None:
                raise ValueError(f"{where}: a second rectangle; one box per request")
            width, height = _percent(value, "width", where), _percent(value, "height", where)
            if width <= 0 or height <= 0:
                raise ValueError(f"{where}: a rectangle needs a positive width and height, got {width:g} x "
                                 f"{height:g} percent")
            rectangle = (x, y, width, height, _percent({"rotation": value.get("rotation") or 0}, "rotation", where))
            positive = True
        if positive and chosen is not None and label is None:
            label = chosen
    if image_name is None:
        raise ValueError("context.result holds no keypointlabels or rectanglelabels region to prompt SAM with")
    if len(points) > MAX_POINTS:
        raise ValueError(f"{len(points)} keypoints in one request: at most {MAX_POINTS} prompt one object")
    if points and not any(p[2] for p in points) and rectangle is None:
        raise ValueError("only negative points: add a positive point or a box to say which object")
    return Click(image_name, tuple(points), rectangle, label)


def _percent(value: dict, key: str, where: str) -> float:
    number = value.get(key)
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
        raise ValueError(f"{where}.value.{key} must be a number (percent of the image), got {number!r}")
    return float(number)

