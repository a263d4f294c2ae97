"""Property tests (hypothesis) of image sizing, coordinate transforms and resize matrices.

Image sides range over 1..20000 pixels (1-pixel strips to panoramas), in both sizings at
several sizes; the resize matrices are checked against PyTorch's own interpolation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sam_mlx  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx  # noqa: E402

from helpers import mask_axes  # noqa: E402
from sam_mlx.modeling.common import linear_resize_matrix  # noqa: E402
from sam_mlx.transforms import PATCH, ImageGeometry, image_geometry, mask_resize_matrix, upscale_masks  # noqa: E402

FAST = settings(max_examples=150, deadline=None)

image_sizes = st.tuples(st.integers(1, 20000), st.integers(1, 20000))
square_sizes = st.sampled_from([16, 64, 256, 512, 1024, 2048]) | st.integers(1, 160).map(lambda k: k * PATCH)
stretch_sizes = st.integers(PATCH, 2048) | st.tuples(*[st.integers(1, 128).map(lambda k: k * PATCH)] * 2)
geometries = st.one_of(
    st.builds(lambda hw, size: image_geometry(hw, "original", size), image_sizes, square_sizes),
    st.builds(lambda hw, size: image_geometry(hw, "stretch", size), image_sizes, stretch_sizes),
)


def points_in(geometry, seed: int) -> np.ndarray:
    """The image's four corners and 60 random points inside it, (x, y) in original pixels."""
    oh, ow = geometry.original_size
    rng = np.random.default_rng(seed)
    corners = np.array([[0, 0], [ow, 0], [0, oh], [ow, oh]], np.float64)
    return np.concatenate([corners, rng.uniform(0, 1, (60, 2)) * [ow, oh]])


@FAST
@given(geometries, st.integers(0, 2**32 - 1))
def test_coordinates_round_trip(geometry, seed):
    """to_original_coords undoes to_input_coords up to float32 rounding, for any image and sizing."""
    points = points_in(geometry, seed)
    back = geometry.to_original_coords(geometry.to_input_coords(points))
    np.testing.assert_allclose(back, points, rtol=1e-6, atol=1e-6)


@FAST
@given(geometries, st.integers(0, 2**32 - 1))
def test_points_in_the_image_map_into_the_input(geometry, seed):
    """Points inside the image land inside input_size, corners on its corners, order preserved."""
    points = points_in(geometry, seed)
    mapped = geometry.to_input_coords(points).astype(np.float64)
    h, w = geometry.input_size
    assert np.all(mapped >= 0) and np.all(mapped <= np.array([w, h]) * (1 + 1e-6))
    np.testing.assert_allclose(mapped[:4], [[0, 0], [w, 0], [0, h], [w, h]], rtol=1e-6)
    for axis in (0, 1):
        order = np.argsort(points[:, axis], kind="stable")
        assert np.all(np.diff(mapped[order, axis]) >= 0)


@FAST
@given(image_sizes, square_sizes)
def test_original_sizing_geometry(hw, size):
    """original: longest side == size, every side >= 1 pixel and within rounding of the exact
    scale, the resized image inside the padded size x size square, a whole token grid."""
    g = image_geometry(hw, "original", size)
    assert max(g.input_size) == size and g.padded_size == (size, size)
    scale = size / max(hw)
    for side, original, padded in zip(g.input_size, hw, g.padded_size):
        assert 1 <= side <= padded
        assert abs(side - original * scale) <= 0.5 or (side == 1 and original * scale < 0.5)
    assert tuple(n * PATCH for n in g.grid_size) == g.padded_size


@FAST
@given(image_sizes, st.integers(PATCH, 2048))
def test_stretch_sizing_geometry(hw, size):
    """stretch at an int size: no padding, sides multiples of 16 and >= 16, each side within
    half a patch of the exact scaled side (so the aspect ratio is the image's up to that rounding)."""
    g = image_geometry(hw, "stretch", size)
    assert g.input_size == g.padded_size
    scale = size / max(hw)
    for side, original in zip(g.input_size, hw):
        exact = original * scale
        assert side % PATCH == 0 and side >= PATCH
        assert abs(side - exact) <= PATCH / 2 + 0.5 or (side == PATCH and exact < PATCH)
    if size % PATCH == 0:
        assert max(g.input_size) == size


@FAST
@given(image_sizes, st.tuples(*[st.integers(1, 256).map(lambda k: k * PATCH)] * 2))
def test_stretch_to_explicit_shape(hw, shape):
    """stretch at an explicit (H, W): exactly that shape, whatever the image."""
    g = image_geometry(hw, "stretch", shape)
    assert g.input_size == g.padded_size == shape and g.original_size == hw



@FAST
@given(geometries)
def test_read_grid_is_the_tokens_post_processing_reads(geometry):
    """read_grid covers every low-res sample (4 x 4 per token) that the upscaling to the padded input weighs
    inside the crop to ``input_size``, its last token row and column are weighed, and without padding it is
    the whole grid."""
    for tokens, read, valid, padded in zip(geometry.grid_size, geometry.read_grid, geometry.input_size,
                                           geometry.padded_size):
        assert 1 <= read <= tokens and (read == tokens or valid < padded)
        upscale = linear_resize_matrix(4 * tokens, padded)[:valid]
        assert 4 * (read - 1) <= np.flatnonzero(upscale.any(axis=0)).max() < 4 * read


@FAST
@given(st.integers(1, 1500), st.integers(1, 1500), st.integers(0, 2**32 - 1))
def test_linear_resize_matrix(in_size, out_size, seed):
    """Rows are convex weights of at most two neighbouring samples (non-negative, sum 1), a
    constant stays constant, and M @ x equals torch's linear interpolate(align_corners=False)
    (in float64: torch's float32 sample positions are off by ~1e-7 x in_size)."""
    m = linear_resize_matrix(in_size, out_size)
    assert m.shape == (out_size, in_size) and np.all(m >= 0)
    np.testing.assert_allclose(m.sum(axis=1), 1, atol=1e-6)
    assert np.all((m > 0).sum(axis=1) <= 2)
    np.testing.assert_allclose(m @ np.full(in_size, 3.25, np.float32), 3.25, rtol=1e-6)
    x = np.random.default_rng(seed).normal(size=(3, in_size))
    expected = F.interpolate(torch.from_numpy(x)[None], size=out_size, mode="linear", align_corners=False)[0]
    np.testing.assert_allclose(x @ m.T, expected.numpy(), atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(mask_axes(), mask_axes(), st.integers(0, 2**32 - 1))
def test_mask_post_processing_is_torch_upscale_crop_resize(rows, cols, seed):
    """Ry @ x @ Rx.T with mask_resize_matrix (``upscale_masks`` on MLX) equals SAM's post-processing in torch
    (float64): bilinear upscale to padded, crop to valid, bilinear to original."""
    (lh, ph, vh, oh), (lw, pw, vw, ow) = rows, cols
    x = np.random.default_rng(seed).normal(size=(2, lh, lw)) * 10
    up = F.interpolate(torch.from_numpy(x)[None], size=(ph, pw), mode="bilinear", align_corners=False)
    expected = F.interpolate(up[..., :vh, :vw], size=(oh, ow), mode="bilinear", align_corners=False)[0].numpy()
    ry, rx = mask_resize_matrix(lh, ph, vh, oh), mask_resize_matrix(lw, pw, vw, ow)
    np.testing.assert_allclose(ry @ x @ rx.T, expected, atol=1e-5)
    geometry = ImageGeometry((oh, ow), (vh, vw), (ph, pw))
    np.testing.assert_allclose(np.array(upscale_masks(mx.array(x.astype(np.float32)), geometry)), expected, atol=1e-4)
