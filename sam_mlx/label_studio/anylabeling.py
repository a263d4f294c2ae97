"""X-AnyLabeling's remote server protocol, served by the same backend: ``GET /v1/models``, ``POST /v1/predict``.

X-AnyLabeling's ``RemoteServer`` model (``anylabeling/services/auto_labeling/remote_server.py``) lists the server's
models (``data``: model id -> ``display_name``, ``widgets``, ``params``, ``batch_processing_mode``; the widgets are
the prompt tools its window shows) and sends ``{model, image: data URI, params: {marks, ...}}``, the marks in image
pixels: ``{"type": "point", "data": [x, y], "label": 1 or 0}`` and ``{"type": "rectangle", "data": [x1, y1, x2,
y2]}``, all of the object being made (so a refinement holds the previous marks: the last mask is its hint). The
answer is ``{"success": true, "data": {"shapes": [...], "description": ""}}``, the mask as polygons (one per
hole-free piece, ``sam_mlx.io.export.mask_polygons``, which needs OpenCV: the ``export`` extra).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from ..app.limits import MAX_POINTS
from .backend import SamBackend

MODEL_ID = "sam_mlx"
LABEL = "AUTOLABEL_OBJECT"  # X-AnyLabeling's label for shapes it has not named yet
WIDGETS = ("button_add_point", "button_remove_point", "button_add_rect", "button_clear", "button_finish_object")


def models(backend: SamBackend) -> dict:
    """The ``/v1/models`` answer: one model, with the point and box tools."""
    widgets = [{"name": name, "value": None} for name in WIDGETS]
    return {"success": True, "data": {MODEL_ID: {"display_name": f"sam_mlx {backend.model.config.name}",
                                                 "widgets": widgets, "params": {}, "batch_processing_mode": "default"}}}


def predict(backend: SamBackend, body: dict) -> dict:
    """A ``/v1/predict`` body -> its answer: the marked object's mask as polygon shapes (ValueError if malformed)."""
    from ..io.export import DEFAULT_SIMPLIFY, mask_polygons

    if body.get("model") != MODEL_ID:
        raise ValueError(f"model must be {MODEL_ID!r} (GET /v1/models), got {body.get('model')!r}")
    data = _image_bytes(body.get("image"))
    params = body.get("params") or {}
    marks = params.get("marks") if isinstance(params, dict) else None
    points, labels, box = _prompt(marks)
    mask, score = backend.segment(data, "an X-AnyLabeling image", points, labels, box)
    shapes = [{"label": LABEL, "shape_type": "polygon", "points": polygon.astype(float).tolist(),
               "score": round(min(max(score, 0.0), 1.0), 5)} for polygon in mask_polygons(mask, DEFAULT_SIMPLIFY)]
    return {"success": True, "data": {"shapes": shapes, "description": ""}}


def _image_bytes(image) -> bytes:
    """A data URI (``data:image/png;base64,...``) or bare base64 -> the image file's bytes."""
    if not isinstance(image, str) or not image:
        raise ValueError("'image' must be the image as a data URI or base64")
    encoded = image.split(",", 1)[1] if image.startswith("data:") else image
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("'image' is not valid base64") from None


def _prompt(marks) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """X-AnyLabeling's marks -> (points N x 2, labels N, box 4), None where absent."""
    if not isinstance(marks, list) or not marks:
        raise ValueError("params.marks must list the points and the rectangle of the object")
    points, labels, box = [], [], None
    for number, mark in enumerate(marks):
        kind = mark.get("type") if isinstance(mark, dict) else None
        values = mark.get("data") if isinstance(mark, dict) else None
        size = {"point": 2, "rectangle": 4}.get(kind)
        if size is None or not isinstance(values, list) or len(values) != size or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"params.marks[{number}] must be {{type: point, data: [x, y], label}} or "
                             f"{{type: rectangle, data: [x1, y1, x2, y2]}}, got {str(mark)[:80]}")
        if kind == "point":
            points.append(values)
            labels.append(1 if mark.get("label", 1) == 1 else 0)
        elif box is not None:
            raise ValueError(f"params.marks[{number}]: a second rectangle; one box per object")
        else:
            box = np.array(values, dtype=np.float64)
    if len(points) > MAX_POINTS:
        raise ValueError(f"{len(points)} point marks: at most {MAX_POINTS} prompt one object")
    if points and not any(labels) and box is None:
        raise ValueError("only negative points: add a positive point or a rectangle")
    if not points:
        return None, None, box
    return np.array(points, dtype=np.float64), np.array(labels), box
