"""Tests for sam_mlx.amg.mask_utils against Meta's amg.py, pycocotools, OpenCV and simple references."""

from __future__ import annotations

import importlib.util
from collections import deque
from pathlib import Path

# --------------------------------------------------------------------------- #
# Test-only references (installed by .ci/run)
# --------------------------------------------------------------------------- #
import cv2
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycocotools import mask as coco_mask

from reference import require
from sam_mlx.amg import mask_utils as mu


def _load_amg():
    """Import segment_anything/utils/amg.py without the package __init__ (which needs torchvision)."""
    spec = require("segment_anything", "Meta's segment-anything")
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "amg.py"
    mod_spec = importlib.util.spec_from_file_location("_sam_original_amg", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


amg = _load_amg()

# pycocotools' decode trips a numpy-2 DeprecationWarning inside pycocotools itself.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def masks_2d(draw, max_side: int = 24):
    """Random bool masks, including all-zero, all-one, 1xN and Nx1 shapes."""
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(1, max_side))
    if draw(st.booleans()):
        h = 1 if draw(st.booleans()) else h
        w = 1 if h != 1 else w
    kind = draw(st.sampled_from(["zeros", "ones", "random", "random", "blobs"]))
    if kind == "zeros":
        return np.zeros((h, w), bool)
    if kind == "ones":
        return np.ones((h, w), bool)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((h, w)) < draw(st.floats(0.0, 1.0))
    # blobs: a few rectangles, so long runs and holes appear
    m = np.zeros((h, w), bool)
    for _ in range(draw(st.integers(1, 5))):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        m[y0 : y0 + rng.integers(1, h + 1), x0 : x0 + rng.integers(1, w + 1)] ^= True
    return m


# --------------------------------------------------------------------------- #
# Grids and crops
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 32, 64])
def test_build_point_grid_matches_original(n):
    np.testing.assert_array_equal(mu.build_point_grid(n), amg.build_point_grid(n))
    assert mu.build_point_grid(n).shape == (n * n, 2)


@pytest.mark.parametrize("n,layers,scale", [(32, 0, 1), (32, 1, 2), (32, 3, 2), (16, 2, 3), (20, 2, 2)])
def test_build_all_layer_point_grids_matches_original(n, layers, scale):
    ours = mu.build_all_layer_point_grids(n, layers, scale)
    ref = amg.build_all_layer_point_grids(n, layers, scale)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (480, 640), (1200, 1800), (1365, 2048), (333, 1001)])
@pytest.mark.parametrize("layers", [0, 1, 2, 3])
@pytest.mark.parametrize("overlap", [0.0, 512 / 1500, 0.25, 0.9])
def test_generate_crop_boxes_matches_original(size, layers, overlap):
    assert mu.generate_crop_boxes(size, layers, overlap) == amg.generate_crop_boxes(size, layers, overlap)


# --------------------------------------------------------------------------- #
# Stability score, boxes, uncropping
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shape", [(5, 16, 16), (2, 3, 9, 31), (1, 1), (4, 0, 7), (3, 64, 48)])
@pytest.mark.parametrize("offset", [1.0, 0.5, 0.1])
def test_stability_score_matches_original(shape, offset):
    rng = np.random.default_rng(sum(shape))
    logits = (rng.standard_normal(shape) * 2).astype(np.float32)
    # put values exactly on (and next to) the thresholds
    flat = logits.reshape(-1)
    if flat.size:
        for v in (offset, -offset, 0.0, np.float32(0.1), np.nextafter(np.float32(offset), np.float32(2))):
            flat[rng.integers(0, flat.size, max(1, flat.size // 20))] = v
    if len(shape) >= 3 and shape[-1] * shape[-2]:
        logits[0] = -10.0  # an all-empty mask gives 0/0 = NaN in both
    ours = mu.calculate_stability_score(logits, 0.0, offset)
    ref = amg.calculate_stability_score(torch.from_numpy(logits), 0.0, offset).numpy()
    assert ours.dtype == np.float32 and ours.shape == shape[:-2]
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("threshold", [0.0, 0.1, -0.3])
def test_stability_score_threshold_in_float32(threshold):
    logits = np.array([[[0.1, 1.1, -0.9, 0.7, 0.2, -0.2]]], dtype=np.float32)
    ours = mu.calculate_stability_score(logits, threshold, 1.0)
    ref = amg.calculate_stability_score(torch.from_numpy(logits), threshold, 1.0).numpy()
    np.testing.assert_array_equal(ours, ref)


@FAST
@given(st.lists(masks_2d(max_side=12), min_size=1, max_size=4), st.integers(0, 2))
def test_batched_mask_to_box_matches_original(mask_list, extra_dims):
    h, w = mask_list[0].shape
    masks = np.stack([np.resize(m, (h, w)) for m in mask_list])
    if extra_dims == 0:
        masks = masks[0]
    elif extra_dims == 2:
        masks = np.stack([masks, masks[::-1]])
    ours = mu.batched_mask_to_box(masks)
    ref = amg.batched_mask_to_box(torch.from_numpy(masks)).numpy()
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)


def test_batched_mask_to_box_empty_input():
    for shape in [(0, 5, 5), (3, 0, 4), (2, 2, 3, 0)]:
        ours = mu.batched_mask_to_box(np.zeros(shape, bool))
        ref = amg.batched_mask_to_box(torch.zeros(shape, dtype=torch.bool)).numpy()
        assert ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)


def test_is_box_near_crop_edge_matches_original():
    rng = np.random.default_rng(3)
    orig_w, orig_h = 1800, 1200
    crops, _ = mu.generate_crop_boxes((orig_h, orig_w), 2, 512 / 1500)
    for crop in crops:
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        x0 = rng.integers(0, cw, 300)
        y0 = rng.integers(0, ch, 300)
        boxes = np.stack([x0, y0, rng.integers(x0, cw), rng.integers(y0, ch)], axis=1).astype(np.int64)
        boxes[:20] = [[0, 0, cw - 1, ch - 1]] * 20
        boxes[20:40, 0] = 20  # exactly at the tolerance
        boxes[40:60, 2] = cw - 21
        for atol in (20.0, 0.0, 5.5):
            ours = mu.is_box_near_crop_edge(boxes, crop, [0, 0, orig_w, orig_h], atol=atol)
            ref = amg.is_box_near_crop_edge(torch.from_numpy(boxes), crop, [0, 0, orig_w, orig_h], atol).numpy()
            np.testing.assert_array_equal(ours, ref)


def test_uncrop_matches_original():
    rng = np.random.default_rng(4)
    crop = [30, 40, 130, 90]
    boxes = rng.integers(0, 50, (7, 4))
    np.testing.assert_array_equal(
        mu.uncrop_boxes_xyxy(boxes, crop), amg.uncrop_boxes_xyxy(torch.from_numpy(boxes), crop).numpy()
    )
    boxes3 = rng.integers(0, 50, (2, 7, 4))
    np.testing.assert_array_equal(
        mu.uncrop_boxes_xyxy(boxes3, crop), amg.uncrop_boxes_xyxy(torch.from_numpy(boxes3), crop).numpy()
    )
    fboxes = rng.random((5, 4)).astype(np.float32) * 50
    ours = mu.uncrop_boxes_xyxy(fboxes, crop)
    ref = amg.uncrop_boxes_xyxy(torch.from_numpy(fboxes), crop).numpy()
    assert ours.dtype == ref.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)
    points = rng.random((9, 2)) * 50
    np.testing.assert_array_equal(
        mu.uncrop_points(points, crop), amg.uncrop_points(torch.from_numpy(points), crop).numpy()
    )
    masks = rng.random((3, 50, 100)) < 0.5
    ours = mu.uncrop_masks(masks, crop, 120, 160)
    ref = amg.uncrop_masks(torch.from_numpy(masks), crop, 120, 160).numpy()
    assert ours.shape == (3, 120, 160)
    np.testing.assert_array_equal(ours, ref)
    assert mu.uncrop_masks(masks, [0, 0, 100, 50], 50, 100) is masks


def test_box_xyxy_to_xywh_matches_original():
    box = np.array([3, 4, 10, 20])
    np.testing.assert_array_equal(mu.box_xyxy_to_xywh(box), amg.box_xyxy_to_xywh(torch.from_numpy(box)).numpy())
    assert box.tolist() == [3, 4, 10, 20]  # input untouched


def test_mask_data_filter_and_cat():
    d = mu.MaskData(a=np.arange(5), b=[10, 11, 12, 13, 14], c=None)
    d.cat(mu.MaskData(a=np.arange(5, 7), b=[15, 16], c=None))
    d.filter(np.array([True, False, True, False, False, True, True]))
    assert d["a"].tolist() == [0, 2, 5, 6] and d["b"] == [10, 12, 15, 16] and d["c"] is None
    d.filter(np.array([3, 0]))
    assert d["a"].tolist() == [6, 0] and d["b"] == [16, 10]
    with pytest.raises(TypeError):
        d["x"] = (1, 2)
    batches = list(mu.batch_iterator(3, np.arange(7), list("abcdefg")))
    assert [len(b[0]) for b in batches] == [3, 3, 1] and batches[2][1] == ["g"]


# --------------------------------------------------------------------------- #
# Run-length encodings
# --------------------------------------------------------------------------- #


@FAST
@given(st.lists(masks_2d(), min_size=1, max_size=3))
def test_mask_to_rle_matches_original_and_round_trips(mask_list):
    h, w = mask_list[0].shape
    masks = np.stack([np.resize(m, (h, w)) for m in mask_list])
    ours = mu.mask_to_rle(masks)
    ref = amg.mask_to_rle_pytorch(torch.from_numpy(masks))
    assert ours == ref
    for rle, m in zip(ours, masks):
        assert all(type(c) is int for c in rle["counts"])
        back = mu.rle_to_mask(rle)
        assert back.dtype == bool and back.flags.c_contiguous
        np.testing.assert_array_equal(back, m)
        np.testing.assert_array_equal(back, amg.rle_to_mask(rle))
        assert mu.area_from_rle(rle) == amg.area_from_rle(rle) == int(m.sum())


def test_rle_basics():
    m = np.array([[0, 1], [1, 1], [0, 0]], bool)  # column-major: 0 1 0 | 1 1 0
    (rle,) = mu.mask_to_rle(m[None])
    assert rle == {"size": [3, 2], "counts": [1, 1, 1, 2, 1]}
    (rle,) = mu.mask_to_rle(np.ones((1, 2, 2), bool))
    assert rle["counts"] == [0, 4]
    (rle,) = mu.mask_to_rle(np.zeros((1, 2, 3), bool))
    assert rle["counts"] == [6]
    with pytest.raises(ValueError):
        mu.rle_to_mask({"size": [2, 2], "counts": [1, 2]})


@FAST
@given(masks_2d(max_side=40))
def test_coco_string_round_trip(m):
    (rle,) = mu.mask_to_rle(m[None])
    enc = mu.coco_encode_rle(rle)
    assert enc["size"] == list(m.shape) and isinstance(enc["counts"], str)
    assert mu.coco_string_to_counts(enc["counts"]) == rle["counts"]
    np.testing.assert_array_equal(mu.coco_decode_rle(enc), m)
    assert mu.coco_rle_area(enc) == int(m.sum())
    assert mu.coco_rle_to_uncompressed(enc) == rle


@FAST
@given(st.lists(st.integers(0, 2**31 - 1), max_size=12))
def test_coco_string_round_trip_arbitrary_counts(counts):
    s = mu.rle_to_coco_string(counts)
    assert all(48 <= ord(c) < 112 for c in s)
    assert mu.coco_string_to_counts(s) == counts
    assert mu.coco_string_to_counts(s.encode()) == counts


def test_coco_string_known_values():
    # hand-derived from maskApi.c: 5-bit groups, 0x20 = continuation, 0x10 = sign;
    # deltas against counts[i-2] only from the fourth count on.
    assert mu.rle_to_coco_string([0]) == "0"
    assert mu.rle_to_coco_string([5, 15, 16]) == "5?`0"
    assert mu.rle_to_coco_string([1, 1, 1, 3, 0]) == "1112O"
    assert mu.rle_to_coco_string([1, 2, 3, 1]) == "123O"  # 1 - 2 = -1 -> 0x1f
    for bad in ["p", "P", " "]:
        with pytest.raises(ValueError):
            mu.coco_string_to_counts(bad)


@FAST
@given(masks_2d(max_side=40))
def test_coco_matches_pycocotools(m):
    ref = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    (rle,) = mu.mask_to_rle(m[None])
    enc = mu.coco_encode_rle(rle)
    assert enc["counts"] == ref["counts"].decode()
    assert enc["size"] == list(ref["size"])
    np.testing.assert_array_equal(mu.coco_decode_rle(ref), coco_mask.decode(ref).astype(bool))
    np.testing.assert_array_equal(mu.coco_decode_rle(enc), coco_mask.decode(ref).astype(bool))
    assert mu.coco_rle_area(enc) == int(coco_mask.area(ref))
    # amg.coco_encode_rle goes through frPyObjects on the uncompressed RLE
    fr = coco_mask.frPyObjects(rle, *m.shape)
    assert fr["counts"].decode() == enc["counts"] and list(fr["size"]) == enc["size"]


def test_coco_matches_pycocotools_large_masks():
    rng = np.random.default_rng(5)
    h, w = 300, 517
    yy, xx = np.mgrid[:h, :w]
    masks = [
        (yy - 150) ** 2 + (xx - 250) ** 2 < 120**2,
        rng.random((h, w)) < 0.5,
        np.zeros((h, w), bool),
        np.ones((h, w), bool),
        (xx // 37 + yy // 11) % 2 == 0,
    ]
    rles = mu.mask_to_rle(np.stack(masks))
    for m, rle in zip(masks, rles):
        ref = coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
        enc = mu.coco_encode_rle(rle)
        assert enc["counts"] == ref["counts"].decode()
        np.testing.assert_array_equal(mu.coco_decode_rle(enc), m)
    # counts with large values and negative deltas, encoded by pycocotools directly
    counts = [0, 70000, 3, 5, 150000, 1, 2**20, 7, 0, 1]
    total = sum(counts)
    fr = coco_mask.frPyObjects({"size": [1, total], "counts": counts}, 1, total)
    assert mu.rle_to_coco_string(counts) == fr["counts"].decode()
    assert mu.coco_string_to_counts(fr["counts"]) == counts


# --------------------------------------------------------------------------- #
# Non-maximum suppression
# --------------------------------------------------------------------------- #


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """Plain O(N^2) transcription of torchvision's CPU kernel (float32 math, stable sort)."""
    n = len(boxes)
    order = sorted(range(n), key=lambda i: -float(scores[i]))  # Python's sort is stable
    b = boxes.astype(np.float32)
    area = [(b[i, 2] - b[i, 0]) * (b[i, 3] - b[i, 1]) for i in range(n)]
    suppressed = [False] * n
    keep = []
    for a, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[a + 1 :]:
            if suppressed[j]:
                continue
            w = max(np.float32(0), min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0]))
            h = max(np.float32(0), min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1]))
            inter = w * h
            with np.errstate(invalid="ignore", divide="ignore"):
                iou = inter / (area[i] + area[j] - inter)
            if float(iou) > thr:
                suppressed[j] = True
    return keep


def _random_boxes(rng, n, span=60, tie_scores=False):
    x0 = rng.integers(0, span, n)
    y0 = rng.integers(0, span, n)
    boxes = np.stack([x0, y0, x0 + rng.integers(0, 25, n), y0 + rng.integers(0, 25, n)], 1).astype(np.float32)
    if tie_scores:
        scores = rng.integers(0, 3, n).astype(np.float32)
    else:
        scores = rng.random(n).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.7, 0.5, 0.0, 0.3])
def test_box_nms_matches_reference(seed, thr):
    rng = np.random.default_rng(seed)
    boxes, scores = _random_boxes(rng, 150, tie_scores=seed % 2 == 0)
    ours = mu.box_nms(boxes, scores, thr)
    assert ours.dtype == np.int64
    assert ours.tolist() == _reference_nms(boxes, scores, thr)
    s = scores[ours]
    assert np.all(s[:-1] >= s[1:])


def test_box_nms_edge_cases():
    assert mu.box_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)
    # zero-area duplicates: IoU = 0/0 = NaN never suppresses
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.5, 0.5], np.float32)
    assert mu.box_nms(boxes, scores, 0.5).tolist() == [0, 1, 2]
    # IoU exactly at the threshold is kept (strict >); threshold compared in double
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 7]], np.float32)  # IoU 0.7 in float32
    scores = np.array([1.0, 0.5], np.float32)
    iou32 = np.float32(70) / np.float32(100)
    assert mu.box_nms(boxes, scores, float(iou32)).tolist() == [0, 1]
    assert mu.box_nms(boxes, scores, 0.7).tolist() == [0, 1]  # float32(0.7) < 0.7
    assert mu.box_nms(boxes, scores, 0.69).tolist() == [0]


def test_box_nms_many_boxes():
    rng = np.random.default_rng(7)
    boxes, scores = _random_boxes(rng, 3000, span=1500)
    boxes[:, 2:] += rng.integers(0, 300, (3000, 2))
    keep = mu.box_nms(boxes, scores, 0.7)
    assert 0 < len(keep) < 3000 and (np.diff(scores[keep]) <= 0).all()


@pytest.mark.parametrize("n", [200, 1500])
def test_batched_box_nms_matches_per_category_reference(n):
    rng = np.random.default_rng(n)
    boxes, scores = _random_boxes(rng, n, tie_scores=True)
    cats = rng.integers(0, 4, n)
    ours = mu.batched_box_nms(boxes, scores, cats, 0.5)
    kept = set()
    for c in np.unique(cats):
        idx = np.flatnonzero(cats == c)
        kept.update(idx[_reference_nms(boxes[idx], scores[idx], 0.5)].tolist())
    expected = sorted(kept, key=lambda i: -float(scores[i]))  # stable: ties by index
    assert ours.tolist() == expected
    # all-zero categories (what the generator uses) is plain NMS
    zeros = mu.batched_box_nms(boxes, scores, np.zeros(n), 0.7)
    assert zeros.tolist() == mu.box_nms(boxes, scores, 0.7).tolist()


# --------------------------------------------------------------------------- #
# Connected components and small regions
# --------------------------------------------------------------------------- #


def _bfs_components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected labelling by breadth-first search; labels in raster order of first pixel."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    n = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not labels[y, x]:
                n += 1
                labels[y, x] = n
                queue = deque([(y, x)])
                while queue:
                    cy, cx = queue.popleft()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                                labels[ny, nx] = n
                                queue.append((ny, nx))
    return n, labels


def _block_first(labels: np.ndarray, n: int) -> np.ndarray:
    """For labels 1..n: raster index of the first 2x2 block (OpenCV's numbering order)."""
    h, w = labels.shape
    ys, xs = np.nonzero(labels)
    key = (ys // 2) * ((w + 1) // 2) + xs // 2
    first = np.full(n + 1, np.iinfo(np.int64).max)
    np.minimum.at(first, labels[ys, xs], key)
    return first


def _reference_remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str):
    """amg.remove_small_regions, with OpenCV's labelling as the original uses."""
    holes = mode == "holes"
    working = holes ^ mask
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working.astype(np.uint8), 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


@FAST
@given(masks_2d(max_side=20))
def test_connected_components_matches_bfs(m):
    n, labels = mu.connected_components(m)
    n_ref, ref = _bfs_components(m)
    assert n == n_ref
    np.testing.assert_array_equal(labels, ref)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(masks_2d(max_side=24), st.sampled_from([1, 2, 3, 4.5, 8, 30, 10**9]), st.sampled_from(["holes", "islands"]))
def test_remove_small_regions_matches_reference(m, thresh, mode):
    out, changed = mu.remove_small_regions(m, thresh, mode)
    ref, ref_changed = _reference_remove_small_regions(m, thresh, mode)
    assert changed == ref_changed
    assert out.dtype == bool
    np.testing.assert_array_equal(out, ref)
    if not changed:
        assert out is m


def test_remove_small_regions_keeps_largest_in_opencv_order():
    # Two single-pixel islands: cv2 numbers (1, 0) before (0, 5) since it scans 2x2 blocks.
    m = np.zeros((4, 10), bool)
    m[1, 0] = m[0, 5] = True
    out, changed = mu.remove_small_regions(m, 100, "islands")
    assert changed and out.sum() == 1 and out[1, 0]
    # A single small island is "changed" even though the mask stays the same.
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    out, changed = mu.remove_small_regions(one, 10, "islands")
    assert changed and np.array_equal(out, one)
    # Holes touching the border are filled too; an empty mask has one background "hole".
    out, changed = mu.remove_small_regions(np.zeros((3, 3), bool), 10, "holes")
    assert changed and out.all()


def test_remove_small_regions_large_masks_and_speed():
    rng = np.random.default_rng(9)
    h, w = 1200, 1800
    yy, xx = np.mgrid[:h, :w]
    blob = ((yy - 600) ** 2 / 400**2 + (xx - 900) ** 2 / 700**2) < 1
    blob &= rng.random((h, w)) > 0.002  # pepper holes
    blob |= rng.random((h, w)) < 0.002  # salt islands
    noisy = rng.random((h, w)) < 0.5
    for m in (blob, noisy):
        for mode in ("holes", "islands"):
            out, changed = mu.remove_small_regions(m, 100, mode)
            ref, ref_changed = _reference_remove_small_regions(m, 100, mode)
            assert changed == ref_changed
            np.testing.assert_array_equal(out, ref)
    # a long serpentine (worst case for label propagation) is still one component
    snake = np.zeros((h, w), bool)
    snake[::4, 1:-1] = True
    snake[1::8, -2] = snake[2::8, -2] = snake[3::8, -2] = True
    snake[5::8, 1] = snake[6::8, 1] = snake[7::8, 1] = True
    n, _ = mu.connected_components(snake)
    assert n == 1
