"""The fast path equals the plain reference model on every path, within float32 rounding.

``FastSam`` (what ``SamPredictor`` and the automatic mask generator run) against ``Sam.encode_image``,
``Sam.decode`` and ``transforms.upscale_masks``: the image encoder at the original and a stretch sizing;
point, box, box-and-point, padded, mask-hint and batched prompts with multimask on and off, whole grid and
the tokens read; mask upscaling and thresholding; for MobileSAM's TinyViT (real weights) and a ViT
(random weights, 9 x 9 windows and 2 global blocks, so its windows are padded).
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from sam_mlx.config import SamConfig, ViTConfig
from sam_mlx.fast import FastSam
from sam_mlx.fast import sam as fast_sam
from sam_mlx.io.images import load_image
from sam_mlx.ops import bands, blas
from sam_mlx.transforms import image_geometry, preprocess, upscale_masks

RNG = np.random.default_rng(0)


def random_vit_sam() -> sam_mlx.Sam:
    """A small SAM with a ViT encoder (9 x 9 windows, global blocks 2 and 5) and random weights."""
    config = SamConfig(encoder=ViTConfig(embed_dim=128, depth=6, num_heads=4, global_attention_blocks=(2, 5),
                                         window_size=9, mlp_dim=512))
    model = sam_mlx.Sam(config)
    params = model.parameters()
    mx.eval(params)
    model.update(nn.utils.tree_map(lambda p: mx.array(RNG.normal(size=p.shape).astype(np.float32) * 0.1), params))
    model.coordinate_encoder.gaussian_matrix = mx.array(RNG.normal(size=(2, 128)).astype(np.float32))
    return model


@pytest.fixture(scope="module", params=["tiny_vit", "vit"])
def model(request) -> sam_mlx.Sam:
    return sam_mlx.load(str(MOBILE_SAM)) if request.param == "tiny_vit" else random_vit_sam()


@pytest.fixture(scope="module")
def truck() -> np.ndarray:
    return load_image(IMAGES / "truck.jpg")


# Largest differences measured, relative to the largest output: image tokens 2e-6, low-res logits 1.3e-5 (with a
# mask hint; the rational GELU is within 2e-6 of erf's), IoU 6e-6, upscaled logits 3e-7.
TOKENS, DECODER, UPSCALING = 1e-5, 5e-5, 2e-6


def assert_close(got, expected, rel: float, what: str) -> None:
    """|got - expected| <= rel x the largest |expected| (float32 rounding, relative to the outputs' size)."""
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    assert got.shape == expected.shape, what
    bound = rel * float(np.abs(expected).max())
    error = float(np.abs(got - expected).max())
    assert error <= bound, f"{what}: largest difference {error:.2e}, bound {bound:.2e}"


@pytest.mark.parametrize("sizing", ["original", "stretch"])
def test_encoder(model, truck, sizing):
    """Row bands, chunked attention (windows padded, global blocks), CPU LayerNorm and GELU, 1x1 convs as
    products and depthwise convs as shifted sums: the plain encoder's image tokens."""
    pixels = preprocess(truck, image_geometry(truck.shape[:2], sizing, 512))
    assert_close(FastSam(model).encode(pixels), model.encode_image(pixels), TOKENS, "image tokens")


PROMPTS = {  # in the original photo's pixels (1800 x 1200)
    "point": dict(points=[[[500, 375]]], labels=[[1]]),
    "fg_bg_points": dict(points=[[[500, 375], [1125, 625], [1500, 800]]], labels=[[1, 1, 0]]),
    "padded_points": dict(points=[[[500, 375], [0, 0]]], labels=[[1, -1]]),
    "box": dict(boxes=[[425, 600, 700, 875]]),
    "box_and_points": dict(boxes=[[425, 600, 700, 875]], points=[[[575, 750], [560, 700]]], labels=[[0, 1]]),
    "batch_of_boxes": dict(boxes=[[425, 600, 700, 875], [75, 275, 1725, 850], [0, 0, 1800, 1200]]),
    "batch_of_points": dict(points=[[[500, 375]], [[1200, 700]], [[100, 1100]]], labels=[[1], [1], [1]]),
}


def encoder_input_prompts(prompt: dict, geometry) -> tuple:
    """A prompt of ``PROMPTS`` in encoder-input pixels: (points, labels) or None, boxes or None."""
    points = boxes = None
    if "points" in prompt:
        coords = geometry.to_input_coords(np.array(prompt["points"], np.float64))
        points = (mx.array(coords), mx.array(np.array(prompt["labels"], np.int32)))
    if "boxes" in prompt:
        corners = np.array(prompt["boxes"], np.float64).reshape(-1, 2, 2)
        boxes = mx.array(geometry.to_input_coords(corners).reshape(-1, 4))
    return points, boxes


@pytest.fixture(scope="module", params=[("original", 512), ("stretch", 512)], ids=["original512", "stretch512"])
def encoded(request, model, truck):
    """The fast path and the photo encoded at a sizing (the same tokens go to both decoders). At 512 the plain
    decoder, whose transposed convs are slow on the CPU, takes a quarter of the time it takes at 1024."""
    fast = FastSam(model)
    return fast, fast.encode_image(truck, image_geometry(truck.shape[:2], *request.param))


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_decode(model, encoded, name, multimask):
    """The low-res logits and IoU predictions of the plain decoder; only the tokens read, that part of them;
    and with each prompt's best mask fed back as a mask hint."""
    check_decode(model, *encoded, PROMPTS[name], multimask)


@pytest.mark.parametrize("name", ["point", "box"])
def test_decode_at_the_original_sizing_1024(model, truck, name):
    """SAM's own sizing: a 64 x 64 token grid, of which the photo's tokens are 43 rows."""
    fast = FastSam(model)
    check_decode(model, fast, fast.encode_image(truck, image_geometry(truck.shape[:2])), PROMPTS[name], True)


def check_decode(model, fast, image, prompt: dict, multimask: bool) -> None:
    geometry = image.geometry
    points, boxes = encoder_input_prompts(prompt, geometry)
    low, iou = fast.decode(image, points, boxes, None, multimask)
    expected_low, expected_iou = model.decode(image.tokens, geometry.padded_size, points, boxes, None, multimask)
    assert_close(low, expected_low, DECODER, "low-res logits")
    assert_close(iou, expected_iou, DECODER, "IoU")
    read, read_iou = fast.decode(image, points, boxes, None, multimask, read_grid_only=True)
    rows, cols = (4 * t for t in geometry.read_grid)
    assert_close(read, np.array(expected_low)[..., :rows, :cols], DECODER, "low-res logits of the tokens read")
    assert_close(read_iou, expected_iou, DECODER, "IoU with the tokens read")

    hints = mx.array(low[np.arange(len(low)), np.argmax(iou, axis=1)])  # B x 4h x 4w
    low, iou = fast.decode(image, points, boxes, hints, multimask)
    expected_low, expected_iou = model.decode(image.tokens, geometry.padded_size, points, boxes, hints, multimask)
    assert_close(low, expected_low, DECODER, "low-res logits with a mask hint")
    assert_close(iou, expected_iou, DECODER, "IoU with a mask hint")


def test_mask_hint_alone(model, encoded):
    """A prompt of only a mask hint (no points, no boxes)."""
    fast, image = encoded
    hint = mx.array(RNG.normal(size=(1, *(4 * t for t in image.geometry.grid_size))).astype(np.float32) * 5)
    low, iou = fast.decode(image, None, None, hint, False)
    expected_low, expected_iou = model.decode(image.tokens, image.geometry.padded_size, None, None, hint, False)
    assert_close(low, expected_low, DECODER, "low-res logits")
    assert_close(iou, expected_iou, DECODER, "IoU")


def test_mask_post_processing(model, encoded):
    """Banded upscaling equals the plain interpolation; masks decided by blocks equal its thresholded logits
    except where a logit is within rounding of the threshold."""
    fast, image = encoded
    points, _ = encoder_input_prompts(PROMPTS["batch_of_points"], image.geometry)
    low, _ = fast.decode(image, points, None, None, True)
    expected = np.array(upscale_masks(mx.array(low), image.geometry))
    assert expected.shape == (3, 3, 1200, 1800)
    assert_close(fast.upscale(image, low), expected, UPSCALING, "upscaled logits")
    masks = fast.masks_above(image, low, (0.0,))[0]
    assert ((masks == (expected > 0)) | (np.abs(expected) < 1e-4 * np.abs(expected).max())).all()
    read, _ = fast.decode(image, points, None, None, True, read_grid_only=True)
    assert_close(fast.upscale(image, read), expected, UPSCALING, "upscaled logits of the tokens read")


def test_predictor_runs_the_fast_path(model, truck):
    """``SamPredictor`` (prompts mapped to the encoder input, masks at the image's size) as the plain model."""
    predictor = sam_mlx.SamPredictor(model, sizing="stretch", size=512)
    predictor.set_image(truck)
    geometry = predictor.geometry
    tokens = model.encode_image(preprocess(truck, geometry))
    assert_close(predictor.features, tokens, TOKENS, "image tokens")
    prompt = PROMPTS["box_and_points"]
    masks, iou, low = predictor.predict(np.array(prompt["points"][0]), np.array(prompt["labels"][0]),
                                        np.array(prompt["boxes"][0]), multimask_output=False)
    points, boxes = encoder_input_prompts(prompt, geometry)
    expected_low, expected_iou = model.decode(tokens, geometry.padded_size, points, boxes, None, False)
    assert_close(low, expected_low[0], DECODER, "low-res logits")
    assert_close(iou, expected_iou[0], DECODER, "IoU")
    logits = np.array(upscale_masks(expected_low, geometry))[0]
    assert ((masks == (logits > 0)) | (np.abs(logits) < 1e-3 * np.abs(logits).max())).all()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sam_mlx loads OpenBLAS on Linux only")
def test_mlx_work_around_prompts_runs_blas_single_threaded(monkeypatch):
    """The image side's projections, the decode, every-pixel mask upscaling and ``return_logits``' upscaling all
    evaluate with OpenBLAS on one thread: after a multi-threaded product its workers spin on for a while, and
    took a core from the next prompts."""
    library = blas._library
    assert library is not None, "no system OpenBLAS loaded (install libopenblas0-pthread)"
    fast = FastSam(sam_mlx.load_checkpoint(MOBILE_SAM))
    monkeypatch.setattr(bands, "band_count", lambda: 2)
    threads_at_eval, threads_at_upscale = [], []
    evaluate, upscale = mx.eval, fast_sam.upscale_mask_logits

    def counting_eval(*arrays):
        threads_at_eval.append(library.openblas_get_num_threads())
        return evaluate(*arrays)

    def counting_upscale(*args):
        threads_at_upscale.append(library.openblas_get_num_threads())
        return upscale(*args)

    monkeypatch.setattr(mx, "eval", counting_eval)
    monkeypatch.setattr(fast_sam, "upscale_mask_logits", counting_upscale)
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(2)
    try:
        image = fast.prepare(mx.array(RNG.normal(size=(1, 64, 64, 256)).astype(np.float32)),
                             image_geometry((1200, 1800)))
        low, _ = fast.decode(image, (mx.array([[[600.0, 400.0]]]), mx.array([[1]])), None, None, True)
        assert fast.upscale(image, low).shape == (1, 3, 1200, 1800)  # as predict(return_logits=True)
        noise = RNG.normal(size=(3, 256, 256)).astype(np.float32) * 3  # every pixel interpolated
        assert fast.masks_above(image, noise, (0.0,))[0].shape == (3, 1200, 1800)
        assert library.openblas_get_num_threads() == 2
    finally:
        library.openblas_set_num_threads(before)
    assert len(threads_at_eval) == 3 and len(threads_at_upscale) == 1  # image side, decode, noise masks; logits
    assert set(threads_at_eval + threads_at_upscale) == {1}
