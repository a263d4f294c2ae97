"""Any-size inputs and batched prompts with the real MobileSAM weights on the shared photos.

- ``stretch`` sizing (no padding; token grid 43 x 64 for these 3:2 photos at 1024) vs the
  ``original`` padded square, for every shared prompt, and how far the original's own small changes
  (1040 instead of 1024, less padding) move the same masks;
- batched boxes (``predict_batch``) vs one ``predict`` call per box;
- images far from the 1024 square (tiny, very elongated).

Each photo is encoded once per sizing for the whole module.
"""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, REFERENCE, predict_kwargs
from sam_mlx.checkpoints.load import load_checkpoint
from sam_mlx.config import ViTConfig
from sam_mlx.fast import FastSam
from sam_mlx.io.images import as_rgb_array
from sam_mlx.modeling.coordinate_encoder import CoordinateEncoder
from sam_mlx.modeling.image_encoder import ImageEncoderViT, relative_position_table
from sam_mlx.transforms import image_geometry, preprocess

NAMES = ("dog", "groceries", "truck")
SIZINGS = {"original": ("original", None), "stretch1024": ("stretch", 1024), "stretch512": ("stretch", 512),
           "original1040": ("original", 1040)}
CASES = [(name, p) for name in NAMES for p in json.loads((REFERENCE / f"{name}.json").read_text())["prompts"]]


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(MOBILE_SAM)


@pytest.fixture(scope="module")
def predictors(model):
    """predictors[(photo, sizing)]: a SamPredictor with that photo encoded, made on first use."""
    cache: dict[tuple[str, str], sam_mlx.SamPredictor] = {}

    def get(name: str, sizing: str) -> sam_mlx.SamPredictor:
        if (name, sizing) not in cache:
            predictor = sam_mlx.SamPredictor(model, *SIZINGS[sizing])
            predictor.set_image(IMAGES / f"{name}.jpg")
            cache[name, sizing] = predictor
        return cache[name, sizing]

    return get


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def matched(predictors):
    """matched(photo, prompt, sizing): ``matched_iou`` of that sizing vs the original, computed once."""
    cache: dict[tuple[str, str, str], float] = {}

    def get(name: str, prompt: dict, sizing: str) -> float:
        key = (name, prompt["name"], sizing)
        if key not in cache:
            cache[key] = matched_iou(predictors(name, "original"), predictors(name, sizing), prompt)
        return cache[key]

    return get


def matched_iou(reference: sam_mlx.SamPredictor, other: sam_mlx.SamPredictor, prompt: dict) -> float:
    """IoU of the reference's chosen mask with the closest of ``other``'s three candidates.

    The fair comparison: the reference's chosen mask is its highest-scoring multimask
    output (SAM's recommended use, what a user takes); it is matched against the best of
    the other sizing's three candidates, because what must agree is the answer, not its
    rank. The single-mask output is not compared: for the shared prompts (lone points and
    boxes on floors, bag groups) it is SAM's least stable output, and the three candidates'
    predicted IoUs are often within 0.03 of each other, so their order flips under any
    change of input (groceries/left_point: 0.96 vs 0.93; dog/fg_bg_points: 0.94 vs 0.95).
    """
    masks, scores, _ = reference.predict(**predict_kwargs(prompt), multimask_output=True)
    others, _, _ = other.predict(**predict_kwargs(prompt), multimask_output=True)
    chosen = masks[np.argmax(scores)]
    return max(iou(chosen, candidate) for candidate in others)


# Stretch at 1024 stays >= 0.9 for 10 of the 12 shared prompts (measured 0.91-0.99). Two boxes over
# empty floor stay below (measured 0.76 and 0.77; their candidates' predicted IoUs 0.50-0.94 and
# 0.68-0.76): their masks move under any small change of input, the original sizing's own included
# (``test_the_original_sizing_moves_these_masks_too``). They are xfailed above a floor a little under
# the measured value, so a regression still fails.
BELOW_09_AT_1024 = {"dog/center_box": 0.72, "groceries/item_box": 0.73}


@pytest.mark.parametrize("name, prompt", CASES, ids=[f"{n}/{p['name']}" for n, p in CASES])
def test_stretch_1024_matches_original(matched, name, prompt):
    value = matched(name, prompt, "stretch1024")
    key = f"{name}/{prompt['name']}"
    if key in BELOW_09_AT_1024:
        assert value >= BELOW_09_AT_1024[key], f"{key}: IoU {value:.3f}"
        pytest.xfail(f"IoU {value:.3f} < 0.9: an unstable prompt (see BELOW_09_AT_1024)")
    assert value >= 0.9, f"{key}: IoU {value:.3f}"


def test_the_original_sizing_moves_these_masks_too(model, predictors, matched):
    """The 0.9 bar is stricter than SAM's own stability. The original sizing run at 1040 instead of 1024 (a 1.5 %
    rescale) keeps 0.9 on fewer shared prompts than stretch does (measured: 9 of 12, below it dog/center_box 0.89,
    groceries/three_points 0.89, groceries/item_box 0.78; stretch 10 of 12), and each prompt below 0.9 in stretch
    falls below it within the original sizing too: at 1040, or padded to 688 rows instead of 1024, the same pixels
    with less padding (measured: dog/center_box 0.67, groceries/item_box 0.82)."""
    rescaled = {f"{name}/{prompt['name']}": matched(name, prompt, "original1040") for name, prompt in CASES}
    stretched = {f"{name}/{prompt['name']}": matched(name, prompt, "stretch1024") for name, prompt in CASES}
    assert sum(v >= 0.9 for v in stretched.values()) >= sum(v >= 0.9 for v in rescaled.values())
    for name, prompt in CASES:
        key = f"{name}/{prompt['name']}"
        if key in BELOW_09_AT_1024:
            original = predictors(name, "original")
            less_padding = sam_mlx.SamPredictor(model)
            geometry = replace(original.geometry, padded_size=(688, 1024))
            tokens = FastSam(model).encode(preprocess(as_rgb_array(IMAGES / f"{name}.jpg"), geometry))
            less_padding.set_image_tokens(tokens, geometry)
            assert min(rescaled[key], matched_iou(original, less_padding, prompt)) < 0.9, key


def test_stretch_512_keeps_large_objects(matched):
    """At 512 (token grid 21 x 32, a quarter of stretch 1024's tokens) big objects survive.

    Measured (matched IoU vs original at 1024): truck/truck_box 0.98, truck/two_points 0.97,
    truck/wheel_box 0.92, but small and thin objects suffer: truck/window_point 0.76 (one window
    pane), groceries/item_box 0.57, dog/center_box 0.74; mean over the 12 prompts 0.85 against
    0.94 for stretch at 1024. Stretch 512 encodes ~4x faster: fine for large objects, not small ones.
    The bounds sit a little under those figures, so a regression fails and an improvement passes.
    """
    values = {f"{name}/{prompt['name']}": matched(name, prompt, "stretch512") for name, prompt in CASES}
    assert values["truck/truck_box"] >= 0.95 and values["truck/two_points"] >= 0.93
    assert values["truck/wheel_box"] >= 0.88 and values["truck/window_point"] >= 0.7
    assert np.mean(list(values.values())) >= 0.8


def test_square_frame_of_coordinates():
    """Prompts and the token grid share the square frame SAM was trained in: a 43 x 64 grid (stretch
    of a 3:2 photo at 1024) gets exactly the encodings of the original's padded square's top 43 rows."""
    encoder = CoordinateEncoder(128)
    encoder.gaussian_matrix = mx.random.normal((2, 128), key=mx.random.key(0))
    np.testing.assert_allclose(np.array(encoder.grid(43, 64)), np.array(encoder.grid(64, 64))[:43], atol=1e-6)
    points = mx.array([[100.5, 600.5], [1000.0, 20.0]])
    np.testing.assert_array_equal(np.array(encoder.encode_points(points, (688, 1024))),
                                  np.array(encoder.encode_points(points, (1024, 1024))))
    # A portrait grid: the x axis is the short one.
    np.testing.assert_allclose(np.array(encoder.grid(64, 43)), np.array(encoder.grid(64, 64))[:, :43], atol=1e-6)


def test_vit_position_encodings_keep_one_scale():
    """The ViT's learned encodings: a grid with the trained scale on its longest side takes the trained
    tables' top-left part and middle offsets, unresized; a smaller grid resizes both axes alike."""
    config = ViTConfig(embed_dim=32, depth=1, num_heads=2, global_attention_blocks=(0,), mlp_dim=64)
    encoding = ImageEncoderViT(config).position_encoding
    encoding.embedding = mx.random.normal(encoding.embedding.shape, key=mx.random.key(1))
    table = mx.random.normal((127, 16), key=mx.random.key(2))
    pe = np.array(encoding.embedding)
    np.testing.assert_array_equal(np.array(encoding.for_grid(43, 64)), pe[:, :43])
    np.testing.assert_array_equal(np.array(relative_position_table(table, 43, 64)),
                                  np.array(relative_position_table(table, 64, 64))[:43, :43])
    half = np.array(encoding.for_grid(32, 32))
    np.testing.assert_allclose(np.array(encoding.for_grid(21, 32)), half[:, :21], atol=1e-6)
    assert np.abs(half - pe[:, ::2, ::2]).max() > 1e-3  # resized (averaged), not subsampled


def test_stretch_geometry(predictors):
    """3:2 photos: stretch keeps the aspect ratio to within 16 px rounding and pads nothing."""
    for name in NAMES:
        for sizing, grid in (("stretch1024", (43, 64)), ("stretch512", (21, 32))):
            g = predictors(name, sizing).geometry
            assert g.input_size == g.padded_size and g.grid_size == grid
            assert predictors(name, sizing).features.shape[1:3] == grid


@pytest.mark.parametrize("sizing, multimask", [("original", True), ("stretch1024", False)])
def test_batched_boxes_equal_one_at_a_time(predictors, sizing, multimask):
    """Four truck boxes (one the whole image, one partly outside it) decoded together vs one by one."""
    predictor = predictors("truck", sizing)
    boxes = np.array([[425, 600, 700, 875], [75, 275, 1725, 850], [0, 0, 1800, 1200], [1500, 900, 2000, 1300]], float)
    masks, scores, low_res = predictor.predict_batch(boxes=boxes, multimask_output=multimask)
    assert masks.shape == (4, 3 if multimask else 1, 1200, 1800)
    for i, box in enumerate(boxes):
        one_masks, one_scores, one_low_res = predictor.predict(box=box, multimask_output=multimask)
        np.testing.assert_allclose(low_res[i], one_low_res, atol=1e-4)
        np.testing.assert_allclose(scores[i], one_scores, atol=1e-5)
        # Logits agree to ~1e-5; a pixel whose logit is that close to 0 may flip.
        assert (masks[i] != one_masks).mean() < 1e-5


def test_batched_points_and_boxes_equal_one_at_a_time(predictors):
    predictor = predictors("groceries", "original")
    points = np.array([[[200, 300], [450, 400]], [[600, 250], [100, 100]], [[300, 200], [700, 500]]], float)
    labels = np.array([[1, 0], [1, 0], [1, 1]])
    boxes = np.array([[100, 150, 350, 480], [450, 100, 750, 450], [0, 0, 800, 534]], float)
    masks, scores, low_res = predictor.predict_batch(points, labels, boxes, multimask_output=False)
    for i in range(3):
        one_masks, one_scores, one_low_res = predictor.predict(points[i], labels[i], boxes[i], multimask_output=False)
        np.testing.assert_allclose(low_res[i], one_low_res, atol=1e-4)
        np.testing.assert_allclose(scores[i], one_scores, atol=1e-5)
        assert (masks[i] != one_masks).mean() < 1e-5


def test_batched_mask_hints_equal_one_at_a_time(predictors):
    """Each prompt of a batch refined by its own mask hint (the dense, per-prompt image side)."""
    predictor = predictors("dog", "original")
    points = np.array([[[300, 300]], [[500, 200]], [[150, 400]]], float)
    labels = np.ones((3, 1))
    _, _, hints = predictor.predict_batch(points, labels, multimask_output=False)
    masks, scores, low_res = predictor.predict_batch(points, labels, mask_input=hints, multimask_output=False)
    assert np.abs(low_res - hints).max() > 0.1  # the hints changed the masks
    for i in range(3):
        one_masks, one_scores, one_low_res = predictor.predict(points[i], labels[i], mask_input=hints[i],
                                                               multimask_output=False)
        np.testing.assert_allclose(low_res[i], one_low_res, atol=1e-4)
        np.testing.assert_allclose(scores[i], one_scores, atol=1e-5)
        assert (masks[i] != one_masks).mean() < 1e-5


@pytest.mark.parametrize(
    "shape, sizing, size, grid",
    [((7, 500), "stretch", 256, (1, 16)), ((300, 20), "stretch", 320, (20, 1)), ((40, 30), "original", 256, (16, 16)),
     ((48, 64), "stretch", (32, 48), (2, 3))],
    ids=["strip", "column", "tiny-original", "explicit-hw"],
)
def test_odd_sized_images(model, shape, sizing, size, grid):
    """Images far from the square: masks come back at the image's size, prompts map to its pixels."""
    rng = np.random.default_rng(0)
    h, w = shape
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image[: h // 2, : w // 2] = 255  # a bright block for the prompt to land on
    predictor = sam_mlx.SamPredictor(model, sizing=sizing, size=size)
    predictor.set_image(image)
    assert predictor.geometry.grid_size == grid == image_geometry(shape, sizing, size).grid_size
    masks, scores, low_res = predictor.predict(np.array([[w / 4, h / 4]]), np.array([1]))
    assert masks.shape == (3, h, w) and masks.dtype == bool and np.isfinite(scores).all()
    assert low_res.shape == (3, 4 * grid[0], 4 * grid[1])
    with pytest.raises(ValueError, match="outside"):
        predictor.predict(np.array([[w + 1, 0]]), np.array([1]))
