"""Linear/bilinear resizing written as matrix products.

A bilinear resize with PyTorch's ``align_corners=False`` convention (no antialias)
is separable: ``out = Ry @ x @ Rx.T`` with one small interpolation matrix per axis.
As matmuls it runs on the fast BLAS/GPU path, composes (two resizes and a crop
become one matrix per axis) and needs no gather. Used for position-encoding and
relative-position tables and for upscaling masks.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np


@lru_cache(maxsize=256)
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of 1-D linear interpolation, half-pixel centres.

    Row i holds the weights of input samples for output sample i, as
    ``torch.nn.functional.interpolate(mode="linear"/"bilinear", align_corners=False)``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo).astype(np.float64)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix.astype(np.float32)


@lru_cache(maxsize=64)
def mask_resize_matrix(low_res: int, padded: int, valid: int, original: int) -> np.ndarray:
    """(original, low_res) matrix: upscale to ``padded``, keep the first ``valid``, resize to ``original``.

    This is SAM's mask post-processing (two bilinear interpolations and a crop)
    folded into a single matrix per axis.
    """
    up = linear_resize_matrix(low_res, padded)[:valid]
    down = linear_resize_matrix(valid, original)
    return (down.astype(np.float64) @ up.astype(np.float64)).astype(np.float32)


def upscale_mask_logits(
    logits: mx.array, padded_size: tuple[int, int], input_size: tuple[int, int], original_size: tuple[int, int]
) -> mx.array:
    """SAM's mask post-processing on ... x h x w low-res logits -> ... x H x W at the original size.

    Equivalent to bilinearly upscaling to the padded encoder input, cropping the padding
    and bilinearly resizing to the original image, done as ``Ry @ logits @ Rx.T`` with the
    two composed interpolation matrices: dense BLAS work instead of gathers, which is
    several times faster on MLX's CPU backend.
    """
    h, w = logits.shape[-2:]
    ry = mx.array(mask_resize_matrix(h, padded_size[0], input_size[0], original_size[0]))
    rx = mx.array(mask_resize_matrix(w, padded_size[1], input_size[1], original_size[1]))
    return ry @ logits.astype(mx.float32) @ rx.T
