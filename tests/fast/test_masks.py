"""The fast mask post-processing (banded interpolation; binary masks decided by blocks, interpolated only at
their edges) against the plain interpolation matrices, property-tested (hypothesis)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import mask_axes
from sam_mlx.fast import masks
from sam_mlx.fast.masks import upscale_mask_logits, upscaled_masks_above
from sam_mlx.transforms import mask_resize_matrix


@settings(max_examples=60, deadline=None)
@given(mask_axes(), mask_axes(), st.integers(0, 2**32 - 1))
def test_banded_upscaling_is_the_plain_one(rows, cols, seed):
    """upscale_mask_logits (each axis's matrix applied band by band) equals Ry @ x @ Rx.T in float64."""
    (lh, ph, vh, oh), (lw, pw, vw, ow) = rows, cols
    x = (np.random.default_rng(seed).normal(size=(2, lh, lw)) * 10).astype(np.float32)
    expected = mask_resize_matrix(lh, ph, vh, oh) @ x.astype(np.float64) @ mask_resize_matrix(lw, pw, vw, ow).T
    got = np.array(upscale_mask_logits(mx.array(x), (ph, pw), (vh, vw), (oh, ow)))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_upscale_mask_logits_keeps_batch_axes():
    """B x C x h x w logits (also B = 0 and a plain h x w) upscale mask by mask, as Ry @ x @ Rx.T."""
    ry, rx = mask_resize_matrix(256, 1024, 683, 1200), mask_resize_matrix(256, 1024, 1024, 1800)
    for shape in [(2, 3, 256, 256), (0, 3, 256, 256), (256, 256)]:
        x = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 10
        got = np.array(upscale_mask_logits(mx.array(x), (1024, 1024), (683, 1024), (1200, 1800)))
        assert got.shape == (*shape[:-2], 1200, 1800)
        np.testing.assert_allclose(got, ry @ x @ rx.T, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(mask_axes(), mask_axes(), st.sampled_from(["blob", "noise", "constant"]), st.integers(0, 2**32 - 1))
def test_masks_above_equal_thresholded_upscaled_logits(rows, cols, kind, seed):
    """upscaled_masks_above (only edge blocks interpolated) equals Ry @ x @ Rx.T > t for thresholds -1, 0, 1,
    except for outputs within float32 rounding of t."""
    (lh, ph, vh, oh), (lw, pw, vw, ow) = rows, cols
    rng = np.random.default_rng(seed)
    if kind == "blob":  # a smooth mask: most blocks lie wholly inside or outside it
        y, x = np.meshgrid(np.linspace(-1, 1, lh), np.linspace(-1, 1, lw), indexing="ij")
        radius = rng.uniform(0.2, 1.5, (2, 1, 1))
        logits = 8 * (radius - np.hypot(y - rng.uniform(-0.5, 0.5), x - rng.uniform(-0.5, 0.5)))
    elif kind == "noise":
        logits = rng.normal(size=(2, lh, lw)) * 3
    else:  # every window wholly on one side of each threshold, or exactly at it
        constant = rng.choice([-1.0, 0.0, 1.0, 5.0])
        logits = np.full((2, lh, lw), constant)
    logits = logits.astype(np.float32)
    expected = mask_resize_matrix(lh, ph, vh, oh) @ logits.astype(np.float64) @ mask_resize_matrix(lw, pw, vw, ow).T
    thresholds = (1.0, 0.0, -1.0)
    for t, got in zip(thresholds, upscaled_masks_above(logits, (ph, pw), (vh, vw), (oh, ow), thresholds)):
        assert got.shape == (2, oh, ow) and got.dtype == bool and got.flags.c_contiguous
        wrong = got != (expected > t)
        assert np.all(np.abs(expected[wrong] - t) < 1e-5)
        if kind == "constant":  # exact, where rounded interpolation weights may miss t by 1e-7
            assert np.all(got == (constant > t))


def test_masks_above_keep_batch_axes():
    """B x C x h x w (also B = 0 and a plain h x w) low-res logits give B x C x H x W masks per threshold."""
    ry, rx = mask_resize_matrix(256, 1024, 683, 1200), mask_resize_matrix(256, 1024, 1024, 1800)
    for shape in [(2, 3, 256, 256), (0, 3, 256, 256), (256, 256)]:
        x = np.random.default_rng(1).normal(size=shape).astype(np.float32) * 10
        above_one, above_zero = upscaled_masks_above(x, (1024, 1024), (683, 1024), (1200, 1800), (1.0, 0.0))
        expected = ry @ x @ rx.T
        for got, t in ((above_one, 1.0), (above_zero, 0.0)):
            assert got.shape == (*shape[:-2], 1200, 1800)
            assert np.all(np.abs(expected[got != (expected > t)] - t) < 1e-4)


@pytest.mark.parametrize("mostly_edges", [0.0, 1.0], ids=["every-pixel", "edge-blocks"])
def test_masks_above_either_way(monkeypatch, mostly_edges):
    """Interpolating every pixel and only the edge blocks give the same masks, for smooth and noisy logits."""
    monkeypatch.setattr(masks, "_MOSTLY_EDGES", mostly_edges)
    rng = np.random.default_rng(3)
    y, x = np.meshgrid(np.linspace(-1, 1, 256), np.linspace(-1, 1, 256), indexing="ij")
    logits = np.stack([8 * (0.6 - np.hypot(y, x)), rng.normal(size=(256, 256)) * 3]).astype(np.float32)
    expected = mask_resize_matrix(256, 1024, 683, 1200) @ logits @ mask_resize_matrix(256, 1024, 1024, 1800).T
    for t, got in zip((1.0, 0.0), upscaled_masks_above(logits, (1024, 1024), (683, 1024), (1200, 1800), (1.0, 0.0))):
        assert got.shape == (2, 1200, 1800) and got.any() and not got.all()
        assert np.all(np.abs(expected[got != (expected > t)] - t) < 1e-4)
