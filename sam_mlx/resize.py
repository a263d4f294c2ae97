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


def resize_2d(x: mx.array, out_hw: tuple[int, int]) -> mx.array:
    """Bilinearly resize the two leading spatial axes of ``x`` (H x W x ...) to ``out_hw``."""
    in_h, in_w = x.shape[0], x.shape[1]
    if (in_h, in_w) == tuple(out_hw):
        return x
    ry = mx.array(linear_resize_matrix(in_h, out_hw[0]))
    rx = mx.array(linear_resize_matrix(in_w, out_hw[1]))
    rest = x.shape[2:]
    y = (ry @ x.reshape(in_h, -1).astype(mx.float32)).reshape(out_hw[0], in_w, -1)
    y = mx.einsum("ow,hwc->hoc", rx, y)
    return y.reshape(out_hw[0], out_hw[1], *rest).astype(x.dtype)


@lru_cache(maxsize=64)
def _mask_resize_band(low_res: int, padded: int, valid: int, original: int) -> tuple[mx.array, mx.array]:
    """The non-zero band of ``mask_resize_matrix``: (original x K) source indices and weights."""
    matrix = mask_resize_matrix(low_res, padded, valid, original)
    nonzero = matrix != 0
    first = nonzero.argmax(axis=1)
    last = low_res - 1 - nonzero[:, ::-1].argmax(axis=1)
    width = int((last - first).max()) + 1
    index = np.minimum(first[:, None] + np.arange(width)[None, :], low_res - 1)
    weight = np.take_along_axis(matrix, index, axis=1)
    weight[first[:, None] + np.arange(width)[None, :] > low_res - 1] = 0.0
    return mx.array(index.astype(np.int32)), mx.array(weight.astype(np.float32))


def _resize_axis(x: mx.array, axis: int, index: mx.array, weight: mx.array) -> mx.array:
    """Apply a banded interpolation along ``axis``: sum_k weight[:, k] * x[index[:, k]]."""
    shape = [1] * x.ndim
    shape[axis] = weight.shape[0]
    out = None
    for k in range(weight.shape[1]):
        term = mx.take(x, index[:, k], axis=axis) * weight[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


def upscale_mask_logits(
    logits: mx.array, padded_size: tuple[int, int], input_size: tuple[int, int], original_size: tuple[int, int]
) -> mx.array:
    """SAM's mask post-processing on ... x h x w low-res logits -> ... x H x W at the original size.

    Equivalent to bilinearly upscaling to the padded encoder input, cropping the padding
    and bilinearly resizing to the original image, done as two banded passes (a few
    taps per output pixel) instead of two full-resolution interpolations.
    """
    h, w = logits.shape[-2:]
    rows = _mask_resize_band(h, padded_size[0], input_size[0], original_size[0])
    cols = _mask_resize_band(w, padded_size[1], input_size[1], original_size[1])
    out = _resize_axis(logits.astype(mx.float32), logits.ndim - 2, *rows)
    return _resize_axis(out, logits.ndim - 1, *cols)
