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


@lru_cache(maxsize=64)
def banded_blocks(matrix_key: tuple[int, int, int, int], rows_per_block: int = 64) -> tuple[np.ndarray, np.ndarray] | None:
    """``mask_resize_matrix(*matrix_key)`` cut into blocks of output rows over their input bands.

    Returns (first input row of each block's band, nBlocks; block weights, nBlocks x rows x K),
    with K the widest band, or None when banding would not save work over the dense product.
    """
    matrix = mask_resize_matrix(*matrix_key)
    out_size, in_size = matrix.shape
    blocks = -(-out_size // rows_per_block)
    padded = np.zeros((blocks * rows_per_block, in_size), np.float32)
    padded[:out_size] = matrix
    padded = padded.reshape(blocks, rows_per_block, in_size)
    used = padded.any(axis=1)  # blocks x in_size: input rows each block reads
    reads = used.any(axis=1)  # False only for all-zero padding blocks
    first = np.where(reads, used.argmax(axis=1), 0)
    last = in_size - np.where(reads, used[:, ::-1].argmax(axis=1), in_size)
    width = int((last - first).max())
    if 2 * width > in_size:  # dense costs out x in, banded out x width plus gathering the bands
        return None
    first = np.minimum(first, in_size - width)
    weights = np.stack([padded[i, :, f : f + width] for i, f in enumerate(first)])
    return first.astype(np.int32), weights


def _resize_rows(x: mx.array, matrix_key: tuple[int, int, int, int]) -> mx.array:
    """mask_resize_matrix(*matrix_key) @ x over x's second-to-last axis: ... x in x n -> ... x out x n.

    Each output row reads only a few neighbouring input rows, so blocks of output rows are
    multiplied with just their band of input rows (SAM's 256 -> 1200 rows: ~17 instead of 256).
    """
    banded = banded_blocks(matrix_key)
    if banded is None:
        return mx.array(mask_resize_matrix(*matrix_key)) @ x
    first, weights = banded
    blocks, rows, width = weights.shape
    *batch, in_size, n = x.shape
    count = int(np.prod(batch))
    # gather the bands as rows of a 2-D array: MLX's take along axis 0 is ~15x faster than along -2
    index = np.arange(count)[:, None] * in_size + (first[:, None] + np.arange(width)).reshape(-1)
    bands = mx.take(x.reshape(count * in_size, n), mx.array(index.reshape(-1)), axis=0)
    out = mx.array(weights) @ bands.reshape(*batch, blocks, width, n)
    return out.reshape(*batch, blocks * rows, n)[..., : matrix_key[3], :]


def upscale_mask_logits(
    logits: mx.array, padded_size: tuple[int, int], input_size: tuple[int, int], original_size: tuple[int, int]
) -> mx.array:
    """SAM's mask post-processing on ... x h x w low-res logits -> ... x H x W at the original size.

    Equivalent to bilinearly upscaling to the padded encoder input, cropping the padding
    and bilinearly resizing to the original image: ``Ry @ logits @ Rx.T`` with the two
    composed interpolation matrices, each applied band by band (matmuls, no per-pixel
    gathers, ~14x fewer multiplications than the dense product for SAM's sizes).
    """
    h, w = logits.shape[-2:]
    columns = _resize_rows(logits.astype(mx.float32).swapaxes(-1, -2), (w, padded_size[1], input_size[1], original_size[1]))
    return _resize_rows(columns.swapaxes(-1, -2), (h, padded_size[0], input_size[0], original_size[0]))
