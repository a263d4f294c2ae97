"""Numpy utilities for SAM's automatic mask generator ("segment everything").

Everything here is plain numpy (no torch, torchvision, OpenCV or pycocotools at
run time).  The semantics follow ``segment_anything/utils/amg.py`` and the
torchvision / pycocotools / OpenCV routines it calls, because the generator's
output is compared with the original's:

* point grids and crop boxes: identical floats / integers;
* ``calculate_stability_score`` (``stability_score_of_masks``): exact integer counts, float32 ratio;
* ``batched_mask_to_box``: inclusive XYXY pixel indices, ``[0, 0, 0, 0]`` for
  empty masks;
* ``box_nms`` / ``batched_box_nms``: torchvision's CPU NMS (stable descending
  sort by score, IoU in the boxes' float precision without ``+1``, suppression
  when ``IoU > threshold`` with the threshold compared in double precision);
* run-length encodings: COCO's column-major uncompressed RLE and the compressed
  string of pycocotools' ``rleToString`` / ``rleFrString``, byte for byte;
* ``remove_small_regions``: ``cv2.connectedComponentsWithStats`` with
  8-connectivity, re-implemented with run-based connected-component labelling.

Coordinates are ``(x, y)``; boxes are ``XYXY`` unless a name says otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Generator, ItemsView, Sequence
from copy import deepcopy
from itertools import product
from typing import Any

import numpy as np

__all__ = [
    "MaskData",
    "area_from_rle",
    "batch_iterator",
    "batched_box_nms",
    "batched_mask_to_box",
    "box_area",
    "box_nms",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_decode_rle",
    "coco_encode_rle",
    "coco_rle_area",
    "coco_rle_to_uncompressed",
    "coco_string_to_counts",
    "connected_components",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle",
    "remove_small_regions",
    "rle_to_coco_string",
    "rle_to_mask",
    "stability_score_of_masks",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]

RLE = dict[str, Any]


# --------------------------------------------------------------------------- #
# Batched storage
# --------------------------------------------------------------------------- #


class MaskData:
    """Per-mask records kept in parallel arrays / lists (numpy port of amg.MaskData).

    Every value is a numpy array whose first axis indexes masks, a list with
    one entry per mask, or ``None``.
    """

    def __init__(self, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            self._check(key, value)
        self._stats: dict[str, Any] = dict(kwargs)

    @staticmethod
    def _check(key: str, value: Any) -> None:
        if value is not None and not isinstance(value, (list, np.ndarray)):
            raise TypeError(f"MaskData only holds lists and numpy arrays; {key!r} is {type(value)}.")

    def __setitem__(self, key: str, item: Any) -> None:
        self._check(key, item)
        self._stats[key] = item

    def __delitem__(self, key: str) -> None:
        del self._stats[key]

    def __getitem__(self, key: str) -> Any:
        return self._stats[key]

    def __contains__(self, key: str) -> bool:
        return key in self._stats

    def items(self) -> ItemsView[str, Any]:
        return self._stats.items()

    def filter(self, keep: np.ndarray | Sequence[int] | Sequence[bool]) -> None:
        """Keep the given entries: ``keep`` is a bool mask (N,) or integer indices (K,)."""
        keep = np.asarray(keep)
        if keep.dtype == bool:
            idx = np.flatnonzero(keep)
        else:
            idx = keep.astype(np.int64, copy=False).reshape(-1)
        for key, value in self._stats.items():
            if value is None:
                continue
            if isinstance(value, np.ndarray):
                self._stats[key] = value[idx]
            else:
                self._stats[key] = [value[i] for i in idx.tolist()]

    def cat(self, new_stats: MaskData) -> None:
        """Append the entries of ``new_stats`` (keys missing here are copied)."""
        for key, value in new_stats.items():
            mine = self._stats.get(key)
            if mine is None:
                self._stats[key] = deepcopy(value)
            elif isinstance(value, np.ndarray):
                self._stats[key] = np.concatenate([mine, value], axis=0)
            elif isinstance(value, list):
                self._stats[key] = mine + deepcopy(value)
            elif value is not None:
                raise TypeError(f"MaskData key {key!r} has an unsupported type {type(value)}.")


def batch_iterator(batch_size: int, *args: Sequence[Any]) -> Generator[list[Any], None, None]:
    """Yield ``[a[i:i+batch_size] for a in args]`` over equally long sequences."""
    if not args or any(len(a) != len(args[0]) for a in args):
        raise ValueError("batch_iterator needs one or more sequences of the same length.")
    n = len(args[0])
    for start in range(0, n, batch_size):
        yield [a[start : start + batch_size] for a in args]


# --------------------------------------------------------------------------- #
# Point grids and crops
# --------------------------------------------------------------------------- #


def build_point_grid(n_per_side: int) -> np.ndarray:
    """Points at the centres of an ``n x n`` grid of cells over ``[0, 1]^2``.

    Returns float64 ``(n*n, 2)`` ``(x, y)`` points, x varying fastest.
    """
    half_cell = 1 / (2 * n_per_side)
    ticks = np.linspace(half_cell, 1 - half_cell, n_per_side)
    ys, xs = np.meshgrid(ticks, ticks, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> list[np.ndarray]:
    """One grid per crop layer ``0..n_layers``; layer ``i`` has ``int(n / scale**i)`` points a side.

    Returns a list of ``n_layers + 1`` arrays of shape ``(k_i*k_i, 2)``.
    """
    return [
        build_point_grid(int(n_per_side / (scale_per_layer**layer))) for layer in range(n_layers + 1)
    ]


def generate_crop_boxes(
    im_size: tuple[int, ...], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """Crop boxes for the full image and ``n_layers`` zoomed layers.

    ``im_size`` is ``(h, w)``.  Layer ``i >= 1`` tiles the image with
    ``2**i x 2**i`` overlapping crops.  Returns ``(crop_boxes, layer_idxs)``:
    XYXY integer boxes and the layer of each box, in the original's order
    (full image first; within a layer x0 is the outer loop, y0 the inner).
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes: list[list[int]] = [[0, 0, im_w, im_h]]
    layers: list[int] = [0]

    for layer in range(1, n_layers + 1):
        n_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / n_side))
        crop_w = int(math.ceil((overlap * (n_side - 1) + im_w) / n_side))
        crop_h = int(math.ceil((overlap * (n_side - 1) + im_h) / n_side))
        xs = [int((crop_w - overlap) * k) for k in range(n_side)]
        ys = [int((crop_h - overlap) * k) for k in range(n_side)]
        for x0, y0 in product(xs, ys):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(layer)
    return boxes, layers


def _offset_like(values: np.ndarray, offset: Sequence[int]) -> np.ndarray:
    """``offset`` as an array whose dtype keeps ``values`` + offset in torch's result dtype."""
    dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.int64
    return np.asarray(offset, dtype=dtype)


def uncrop_boxes_xyxy(boxes: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """Shift XYXY boxes ``(..., 4)`` from crop to image coordinates.

    Float boxes keep their dtype; integer boxes become int64 (as in torch).
    """
    boxes = np.asarray(boxes)
    x0, y0 = int(crop_box[0]), int(crop_box[1])
    return boxes + _offset_like(boxes, [x0, y0, x0, y0])


def uncrop_points(points: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    """Shift ``(x, y)`` points ``(..., 2)`` from crop to image coordinates."""
    points = np.asarray(points)
    return points + _offset_like(points, [int(crop_box[0]), int(crop_box[1])])


def uncrop_masks(masks: np.ndarray, crop_box: Sequence[int], orig_h: int, orig_w: int) -> np.ndarray:
    """Zero-pad crop masks ``(..., h_crop, w_crop)`` into the image frame ``(..., orig_h, orig_w)``.

    Returns ``masks`` itself when the crop is the whole image.
    """
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if x0 == 0 and y0 == 0 and x1 == orig_w and y1 == orig_h:
        return masks
    masks = np.asarray(masks)
    if masks.shape[-2:] != (y1 - y0, x1 - x0):
        raise ValueError(f"masks of shape {masks.shape} do not match crop box {list(crop_box)}.")
    out = np.zeros(masks.shape[:-2] + (orig_h, orig_w), dtype=masks.dtype)
    out[..., y0:y1, x0:x1] = masks
    return out


def is_box_near_crop_edge(
    boxes: np.ndarray, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0
) -> np.ndarray:
    """Which boxes touch an edge of the crop that is not an edge of the image.

    ``boxes`` are ``(N, 4)`` XYXY in crop coordinates; ``crop_box`` and
    ``orig_box`` are XYXY in image coordinates.  A coordinate is "near" when
    ``|a - b| <= atol`` in float32 (torch.isclose with rtol=0).  Returns bool (N,).
    """
    boxes = uncrop_boxes_xyxy(np.asarray(boxes), crop_box).astype(np.float32)
    crop = np.asarray(crop_box, dtype=np.float32)[None, :]
    orig = np.asarray(orig_box, dtype=np.float32)[None, :]
    tol = np.float32(atol)

    def close(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        err = np.abs(a - b)
        return (a == b) | (np.isfinite(err) & (err <= tol))

    with np.errstate(invalid="ignore", over="ignore"):
        near_crop = close(boxes, crop) & ~close(boxes, orig)
    return near_crop.any(axis=1)


# --------------------------------------------------------------------------- #
# Masks, scores and boxes
# --------------------------------------------------------------------------- #


def calculate_stability_score(
    mask_logits: np.ndarray, mask_threshold: float, threshold_offset: float
) -> np.ndarray:
    """IoU of ``logits > thr + off`` and ``logits > thr - off`` (the first is inside the second).

    ``mask_logits`` is ``(..., H, W)``; returns float32 ``(...)``.  The thresholds
    are compared in the logits' dtype (as torch does with a Python scalar).
    """
    logits = np.asarray(mask_logits)
    dtype = logits.dtype if np.issubdtype(logits.dtype, np.floating) else np.float64
    hi = np.asarray(mask_threshold + threshold_offset, dtype=dtype)
    lo = np.asarray(mask_threshold - threshold_offset, dtype=dtype)
    return stability_score_of_masks(logits > hi, logits > lo)


def stability_score_of_masks(inner: np.ndarray, outer: np.ndarray) -> np.ndarray:
    """IoU of binary masks ``inner`` (..., H, W) lying inside ``outer``: exact pixel counts, float32 ratio (...).

    0/0 gives NaN, like the original.
    """
    lead = inner.shape[:-2]
    # one mask at a time: whole-array count_nonzero is fast
    inter = np.array([np.count_nonzero(m) for m in inner.reshape(math.prod(lead), -1)], dtype=np.int64)
    union = np.array([np.count_nonzero(m) for m in outer.reshape(math.prod(lead), -1)], dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = inter.astype(np.float32) / union.astype(np.float32)
    return score.reshape(lead)


def batched_mask_to_box(masks: np.ndarray) -> np.ndarray:
    """Tight XYXY boxes (inclusive pixel indices) around masks ``(..., H, W)`` -> int64 ``(..., 4)``.

    An empty mask gives ``[0, 0, 0, 0]``.  (For an input with no elements the
    original returns float32 zeros; this returns int64 zeros.)
    """
    masks = np.asarray(masks)
    if masks.ndim < 2:
        raise ValueError("masks must have shape (..., H, W).")
    lead = masks.shape[:-2]
    if masks.size == 0:
        return np.zeros(lead + (4,), dtype=np.int64)
    masks = masks.astype(bool, copy=False)
    h, w = masks.shape[-2:]
    rows = masks.any(axis=-1)  # (..., H)
    cols = masks.any(axis=-2)  # (..., W)
    top = np.argmax(rows, axis=-1)
    bottom = h - 1 - np.argmax(rows[..., ::-1], axis=-1)
    left = np.argmax(cols, axis=-1)
    right = w - 1 - np.argmax(cols[..., ::-1], axis=-1)
    out = np.stack([left, top, right, bottom], axis=-1).astype(np.int64)
    out[~rows.any(axis=-1)] = 0
    return out


def box_xyxy_to_xywh(box_xyxy: np.ndarray) -> np.ndarray:
    """Convert one XYXY box ``(4,)`` (or ``(N, 4)``) to XYWH; returns a new array."""
    box = np.array(box_xyxy, copy=True)
    box[..., 2] = box[..., 2] - box[..., 0]
    box[..., 3] = box[..., 3] - box[..., 1]
    return box


def box_area(boxes: np.ndarray) -> np.ndarray:
    """``(x1 - x0) * (y1 - y0)`` for XYXY boxes ``(..., 4)``, in the boxes' dtype (torchvision.box_area).

    To reproduce the generator's crop-NMS scores ``1 / box_area(crop_boxes)``
    exactly, use ``np.float32(1) / box_area(b).astype(np.float32)``.
    """
    boxes = np.asarray(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


# --------------------------------------------------------------------------- #
# Non-maximum suppression (torchvision semantics)
# --------------------------------------------------------------------------- #


def _descending_stable_order(scores: np.ndarray) -> np.ndarray:
    """Indices sorting ``scores`` high to low, ties by index, NaN first (torch.sort, stable)."""
    nan = np.isnan(scores) if np.issubdtype(scores.dtype, np.floating) else np.zeros(scores.shape, bool)
    key = np.where(nan, 0, scores)
    if np.issubdtype(key.dtype, np.floating) or np.issubdtype(key.dtype, np.signedinteger):
        neg = -key
    else:  # unsigned / bool
        neg = -(key.astype(np.int64))
    return np.lexsort((neg, ~nan)).astype(np.int64)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS, matching ``torchvision.ops.nms`` on CPU.

    Args:
        boxes: ``(N, 4)`` XYXY; float32/float64 keep their precision (integers
            are converted to float32).
        scores: ``(N,)``.
        iou_threshold: a box is dropped when its IoU with an already kept,
            higher-ranked box is ``> iou_threshold``.

    Boxes are visited in a *stable* descending sort of ``scores`` (ties in
    index order), as torchvision's kernel does.  IoU is computed like the C++
    kernel: ``area = (x1-x0)*(y1-y0)``, ``inter = max(0, w) * max(0, h)``,
    ``iou = inter / (area_i + area_j - inter)``, all in the boxes' dtype; NaN
    IoUs (two zero-area boxes) never suppress.

    Returns int64 ``(K,)`` indices of kept boxes, by descending score.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or boxes.shape[0] != scores.shape[0]:
        raise ValueError("box_nms needs boxes (N, 4) and scores (N,).")
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    if not np.issubdtype(boxes.dtype, np.floating):
        boxes = boxes.astype(np.float32)
    order = _descending_stable_order(scores)

    # Columns in visiting order, so each step works on contiguous slices.
    x0, y0, x1, y1 = (np.ascontiguousarray(boxes[order, k]) for k in range(4))
    areas = (x1 - x0) * (y1 - y0)
    zero = boxes.dtype.type(0)
    thr = float(iou_threshold)

    keep: list[int] = []
    alive = np.arange(order.shape[0])  # positions (in visiting order) not yet suppressed
    while alive.shape[0]:
        i = alive[0]
        keep.append(int(order[i]))
        rest = alive[1:]
        if rest.shape[0] == 0:
            break
        w = np.maximum(np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]), zero)
        h = np.maximum(np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]), zero)
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / ((areas[i] + areas[rest]) - inter)
        # The kernel compares the float IoU with the double threshold.
        alive = rest[~(iou.astype(np.float64) > thr)]
    return np.asarray(keep, dtype=np.int64)


def batched_box_nms(
    boxes: np.ndarray, scores: np.ndarray, categories: np.ndarray, iou_threshold: float
) -> np.ndarray:
    """NMS within each category, matching ``torchvision.ops.batched_nms`` on CPU.

    Like torchvision, inputs with ``boxes.size <= 4000`` (N <= 1000) use the
    "coordinate trick": boxes are shifted by ``category * (boxes.max() + 1)``
    in the boxes' dtype and one NMS is run; larger inputs run one NMS per
    category.  Returns int64 indices of kept boxes sorted by descending score;
    ties are in index order (stable).  For N > 1000 torchvision orders equal
    scores with an unstable sort, so only the order among exactly equal scores
    can differ from it; the set of kept boxes is the same.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores).reshape(-1)
    categories = np.asarray(categories).reshape(-1)
    if boxes.shape[0] == 0:
        return np.zeros((0,), dtype=np.int64)
    if not np.issubdtype(boxes.dtype, np.floating):
        boxes = boxes.astype(np.float32)
    if boxes.size <= 4000:
        ftype = boxes.dtype.type
        offsets = categories.astype(boxes.dtype) * (boxes.max() + ftype(1))
        return box_nms(boxes + offsets[:, None], scores, iou_threshold)
    keep_mask = np.zeros(boxes.shape[0], dtype=bool)
    for cat in np.unique(categories):
        members = np.flatnonzero(categories == cat)
        keep_mask[members[box_nms(boxes[members], scores[members], iou_threshold)]] = True
    kept = np.flatnonzero(keep_mask)
    return kept[_descending_stable_order(scores[kept])].astype(np.int64)


# --------------------------------------------------------------------------- #
# Uncompressed run-length encoding (COCO, column-major)
# --------------------------------------------------------------------------- #


def mask_to_rle(masks: np.ndarray) -> list[RLE]:
    """Encode masks ``(N, H, W)`` as COCO uncompressed RLEs.

    Each RLE is ``{"size": [H, W], "counts": [...]}``: alternating run lengths
    of 0s and 1s over the mask in column-major (Fortran) order, starting with
    the number of leading 0s (which is 0 when the first pixel is set).
    Counts are Python ints summing to ``H * W``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError("mask_to_rle expects masks of shape (N, H, W).")
    n, h, w = masks.shape
    total = h * w
    out: list[RLE] = []
    for k in range(n):
        flat = np.ravel(masks[k].astype(bool, copy=False), order="F")
        if total == 0:
            out.append({"size": [h, w], "counts": [0]})
            continue
        bounds = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        edges = np.concatenate(([0], bounds, [total]))
        runs = np.diff(edges).tolist()
        counts = [0] + runs if flat[0] else runs
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: RLE) -> np.ndarray:
    """Decode an uncompressed RLE to a C-contiguous bool mask ``(H, W)``."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64).reshape(-1)
    if counts.size and counts.min() < 0:
        raise ValueError("RLE counts must be non-negative.")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w}.")
    values = (np.arange(counts.shape[0]) % 2).astype(bool)
    flat = np.repeat(values, counts)
    return np.ascontiguousarray(flat.reshape(w, h).T)


def area_from_rle(rle: RLE) -> int:
    """Number of set pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


# --------------------------------------------------------------------------- #
# Compressed COCO RLE (pycocotools' string format)
# --------------------------------------------------------------------------- #


def rle_to_coco_string(counts: Sequence[int]) -> str:
    """COCO's compact string for RLE counts (pycocotools ``rleToString``).

    Each count from the fourth on is replaced by its difference with the count
    two places before it; every value is then written as little-endian 5-bit
    groups in characters ``chr(48 + g)``, where bit 0x20 marks "more groups
    follow" and bit 0x10 of the last group is the sign.
    """
    vals = [int(c) for c in counts]
    chars: list[str] = []
    for i, value in enumerate(vals):
        x = value - vals[i - 2] if i > 2 else value
        while True:
            group = x & 0x1F
            x >>= 5  # arithmetic shift, like the C code on a signed long
            more = x != -1 if group & 0x10 else x != 0
            chars.append(chr(48 + (group | 0x20 if more else group)))
            if not more:
                break
    return "".join(chars)


def coco_string_to_counts(s: str | bytes) -> list[int]:
    """Inverse of :func:`rle_to_coco_string` (pycocotools ``rleFrString``).

    Raises ValueError on characters outside ``'0'..'o'``, on a truncated last
    value and on counts that come out negative.
    """
    if isinstance(s, (bytes, bytearray)):
        s = s.decode("ascii")
    counts: list[int] = []
    x = shift = 0
    for ch in s:
        code = ord(ch) - 48
        if not 0 <= code < 64:
            raise ValueError(f"invalid character {ch!r} in COCO RLE string.")
        x |= (code & 0x1F) << shift
        shift += 5
        if code & 0x20:
            continue
        if code & 0x10:  # sign-extend
            x -= 1 << shift
        m = len(counts)
        if m > 2:
            x += counts[m - 2]
        if x < 0:
            raise ValueError("COCO RLE string decodes to a negative count.")
        counts.append(x)
        x = shift = 0
    if shift:
        raise ValueError("truncated COCO RLE string.")
    return counts


def coco_encode_rle(uncompressed_rle: RLE) -> RLE:
    """Uncompressed RLE -> ``{"size": [h, w], "counts": str}`` (as amg.coco_encode_rle)."""
    h, w = (int(v) for v in uncompressed_rle["size"])
    return {"size": [h, w], "counts": rle_to_coco_string(uncompressed_rle["counts"])}


def coco_rle_to_uncompressed(rle: RLE) -> RLE:
    """``{"size", "counts": str | bytes}`` -> uncompressed RLE (list counts)."""
    h, w = (int(v) for v in rle["size"])
    return {"size": [h, w], "counts": coco_string_to_counts(rle["counts"])}


def coco_decode_rle(rle: RLE) -> np.ndarray:
    """Compressed COCO RLE -> bool mask ``(H, W)``."""
    return rle_to_mask(coco_rle_to_uncompressed(rle))


def coco_rle_area(rle: RLE) -> int:
    """Number of set pixels of a compressed COCO RLE."""
    return int(sum(coco_string_to_counts(rle["counts"])[1::2]))


# --------------------------------------------------------------------------- #
# Connected components and small-region removal
# --------------------------------------------------------------------------- #


def _row_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True in a bool ``(H, W)`` mask, in raster order.

    Returns ``(row, start, end)`` int64 arrays (``end`` exclusive).
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=bool)
    padded[:, 1:-1] = mask
    # Transition at grid column j of row r  <=>  mask[r, j] != mask[r, j-1].
    flips = np.flatnonzero(padded[:, 1:] != padded[:, :-1])
    starts, ends = flips[0::2], flips[1::2]  # every row starts and ends with False
    row = starts // (w + 1)
    return row, starts - row * (w + 1), ends - row * (w + 1)


def _run_components(row: np.ndarray, start: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """Component id (the smallest run index in it) of each run, under 8-connectivity."""
    n = row.shape[0]
    if n == 0:
        return np.zeros((0,), dtype=np.int64)
    stride = width + 1
    key_start = row * stride + start
    key_end = row * stride + end
    # Run a (row r) touches run b (row r+1) iff start_b <= end_a and start_a <= end_b.
    below = (row + 1) * stride
    lo = np.searchsorted(key_end, below + start, side="left")
    hi = np.searchsorted(key_start, below + end, side="right")
    n_links = np.maximum(hi - lo, 0)
    total = int(n_links.sum())
    parent = np.arange(n, dtype=np.int64)
    if total == 0:
        return parent
    u = np.repeat(np.arange(n, dtype=np.int64), n_links)
    first = np.cumsum(n_links) - n_links
    v = np.arange(total, dtype=np.int64) - np.repeat(first - lo, n_links)

    # Union-find by hooking roots onto the smaller root, then full path compression.
    while u.shape[0]:
        ru, rv = parent[u], parent[v]
        live = ru != rv
        if not live.any():
            break
        u, v, ru, rv = u[live], v[live], ru[live], rv[live]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def connected_components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected components of a bool mask ``(H, W)``.

    Returns ``(n, labels)``: labels int32 ``(H, W)``, 0 for background and
    ``1..n`` for components numbered in raster order of their first pixel.
    (OpenCV's label order can differ; only :func:`remove_small_regions`
    needs its order, and it emulates it.)
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    h, w = mask.shape
    row, start, end = _row_runs(mask)
    comp = _run_components(row, start, end, w)
    roots, label_of_run = np.unique(comp, return_inverse=True)  # roots ascend = raster order
    labels = np.zeros((h, w + 1), dtype=np.int32)
    flat = labels.reshape(-1)
    base = row * (w + 1)
    delta = np.zeros(h * (w + 1) + 1, dtype=np.int64)
    np.add.at(delta, base + start, label_of_run + 1)
    np.add.at(delta, base + end, -(label_of_run + 1))
    flat[:] = np.cumsum(delta[:-1])
    return int(roots.shape[0]), np.ascontiguousarray(labels[:, :w])


def _paint_runs(h: int, w: int, row: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Bool ``(H, W)`` mask that is True on the given (disjoint) runs."""
    stride = w + 1
    delta = np.zeros(h * stride + 1, dtype=np.int8)
    delta[row * stride + start] = 1
    delta[row * stride + end] = -1
    painted = np.cumsum(delta[:-1], dtype=np.int8).astype(bool)
    return np.ascontiguousarray(painted.reshape(h, stride)[:, :w])


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> tuple[np.ndarray, bool]:
    """Fill small holes or drop small islands of a bool mask ``(H, W)`` (amg.remove_small_regions).

    Regions are 8-connected components (of ``~mask`` for ``mode="holes"``,
    of ``mask`` for ``mode="islands"``); a region is small when its pixel
    count is ``< area_thresh``.  If no region is small the input is returned
    unchanged with ``False``.  Otherwise ``"holes"`` fills every small
    component of ``~mask`` (including ones touching the border), and
    ``"islands"`` keeps only the components that are not small -- or, if all
    are small, the largest one (first in OpenCV's label order on ties).
    Returns ``(mask, changed)``.
    """
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}.")
    holes = mode == "holes"
    arr = np.asarray(mask).astype(bool, copy=False)
    if arr.ndim != 2:
        raise ValueError("remove_small_regions expects a 2-D mask.")
    h, w = arr.shape
    if h == 0 or w == 0:
        return mask, False
    working = ~arr if holes else arr

    row, start, end = _row_runs(working)
    comp = _run_components(row, start, end, w)  # root run of each run
    n_runs = comp.shape[0]
    is_root = comp == np.arange(n_runs)
    sizes = np.bincount(comp, weights=(end - start), minlength=n_runs).astype(np.int64)
    small = is_root & (sizes < area_thresh)  # indexed by root run
    if not small.any():
        return mask, False

    if holes:
        pick = small[comp]
        return arr | _paint_runs(h, w, row[pick], start[pick], end[pick]), True

    big = is_root & ~small
    if big.any():
        pick = big[comp]
    else:
        # Every region is small: keep the largest.  The original takes the
        # first of the largest in cv2's label order; cv2 numbers 8-connected
        # components by their first 2x2 pixel block in raster order of blocks
        # (its 8-connectivity algorithms scan 2x2 blocks).
        block = (row // 2) * ((w + 1) // 2) + start // 2
        first_block = np.full(n_runs, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(first_block, comp, block)
        largest = np.flatnonzero(is_root & (sizes == sizes[is_root].max()))
        chosen = largest[np.argmin(first_block[largest])]
        pick = comp == chosen
    return _paint_runs(h, w, row[pick], start[pick], end[pick]), True
