"""SAM's mask post-processing, fast: low-res logits -> masks at the image's size.

The reference is ``transforms.upscale_masks``: ``Ry @ logits @ Rx.T`` with one interpolation matrix per
axis (``transforms.mask_resize_matrix``: upscale to the padded input, crop, resize to the image). Here:
- each matrix is applied band by band: a block of 64 output rows reads only a narrow band of input
  rows, so a gather and one batched product replace the dense one (``upscale_mask_logits``);
- binary masks are interpolated only in the blocks at their edge: every output is a weighted mean of its
  band's logits, so a block whose band lies wholly above or below the threshold is decided without
  interpolating (``upscaled_masks_above``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import mlx.core as mx
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..ops.blas import single_threaded
from ..transforms import mask_resize_matrix


@lru_cache(maxsize=64)
def banded_blocks(matrix_key: tuple[int, int, int, int], rows_per_block: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``mask_resize_matrix(*matrix_key)`` cut into blocks of output rows over their input bands.

    Returns (first input row of each block's band, nBlocks; block weights, nBlocks x rows x K),
    with K the widest band. When banding would not save work over the dense product, the
    whole matrix is one block (first row 0, K = all input rows).
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
        return np.zeros(1, np.int32), matrix[None]
    first = np.minimum(first, in_size - width)
    weights = np.stack([padded[i, :, f : f + width] for i, f in enumerate(first)])
    return first.astype(np.int32), weights


def _band_rows(first: np.ndarray, width: int) -> np.ndarray:
    """nBlocks x width: the input rows each block's band reads."""
    return first[:, None] + np.arange(width)


def upscale_mask_logits(
    logits: mx.array, padded_size: tuple[int, int], input_size: tuple[int, int], original_size: tuple[int, int]
) -> mx.array:
    """SAM's mask post-processing on ... x h x w low-res logits -> ... x H x W at the original size.

    Equivalent to bilinearly upscaling to the padded encoder input, cropping the padding
    and bilinearly resizing to the original image: ``Ry @ logits @ Rx.T`` with the two
    composed interpolation matrices, each applied band by band (``banded_blocks``): a gather
    of the input rows a block of 64 outputs reads, then one batched matmul (no per-pixel
    gathers, ~14x fewer multiplications than the dense product for SAM's sizes).

    1. Columns: every row of every mask, cut into blocks of output columns -> nCol x (N h) x 64.
    2. Rows: each block of output rows gathers its band of input rows from all column blocks
       in turn, which lays the column blocks side by side: the transpose between the two passes
       happens inside that gather (a separate transpose of the intermediate costs more than both matmuls).
    The result is cropped from the blocks' padding to H x W (a view).
    """
    *batch, h, w = logits.shape
    count = int(np.prod(batch)) * h  # rows of all masks
    row_first, row_weights = banded_blocks((h, padded_size[0], input_size[0], original_size[0]))
    col_first, col_weights = banded_blocks((w, padded_size[1], input_size[1], original_size[1]))
    col_blocks, block_cols, col_width = col_weights.shape
    columns = mx.contiguous(logits.astype(mx.float32).reshape(count, w).T)  # w x (N h)
    bands = mx.take(columns, mx.array(_band_rows(col_first, col_width).reshape(-1)), axis=0)
    bands = bands.reshape(col_blocks, col_width, count).swapaxes(1, 2)
    by_column_block = bands @ mx.array(col_weights.transpose(0, 2, 1))  # nCol x (N h) x 64
    # rows (mask n, row block i, band row t) of every column block j: n x i x t x (j, 64)
    row_blocks, block_rows, row_width = row_weights.shape
    masks = count // h
    index = (
        (np.arange(masks) * h)[:, None, None, None]
        + _band_rows(row_first, row_width)[None, :, :, None]
        + (np.arange(col_blocks) * count)[None, None, None, :]
    )
    bands = mx.take(by_column_block.reshape(col_blocks * count, block_cols), mx.array(index.reshape(-1)), axis=0)
    out = mx.array(row_weights) @ bands.reshape(masks, row_blocks, row_width, col_blocks * block_cols)
    out = out.reshape(*batch, row_blocks * block_rows, col_blocks * block_cols)
    return out[..., : original_size[0], : original_size[1]]


# Above this fraction of blocks at a mask's edge, ``upscaled_masks_above`` interpolates every pixel (the break-even
# of three thresholds, docs/performance.md).
_MOSTLY_EDGES = 0.25


def upscaled_masks_above(
    low_res: np.ndarray,
    padded_size: tuple[int, int],
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    thresholds: Sequence[float],
) -> list[np.ndarray]:
    """``upscale_mask_logits(low_res, ...) > t`` for each threshold t, as bool ... x H x W arrays.

    Each output is a weighted mean of the low-res logits in its band (``mask_resize_matrix``),
    so a block of 64 x 64 outputs whose band window holds only logits above t is all above t,
    and one with none above t is all at or below it. Only the blocks whose window straddles a
    threshold, the mask's edge (a small share of a real mask's blocks), are interpolated. In numpy,
    as the masks are wanted there; when most blocks straddle (``_MOSTLY_EDGES``), every pixel is
    interpolated instead.
    """
    low_res = np.asarray(low_res, dtype=np.float32)
    *batch, h, w = low_res.shape
    low = low_res.reshape(-1, h, w)
    row_first, row_weights = banded_blocks((h, padded_size[0], input_size[0], original_size[0]))
    col_first, col_weights = banded_blocks((w, padded_size[1], input_size[1], original_size[1]))
    (row_blocks, block_rows, row_width), (_, block_cols, col_width) = row_weights.shape, col_weights.shape
    rows = sliding_window_view(low, row_width, axis=1)[:, row_first]  # masks x row blocks x w x band
    window_min = sliding_window_view(rows.min(-1), col_width, axis=2)[:, :, col_first].min(-1)
    window_max = sliding_window_view(rows.max(-1), col_width, axis=2)[:, :, col_first].max(-1)
    straddling = np.zeros(window_min.shape, bool)
    for t in thresholds:
        straddling |= (window_min <= t) & (window_max > t)
    if np.count_nonzero(straddling) > _MOSTLY_EDGES * straddling.size:  # e.g. noise: interpolating all is cheaper
        logits = upscale_mask_logits(mx.array(low_res), padded_size, input_size, original_size)
        masks = [logits > t for t in thresholds]
        with single_threaded():  # slower here, but no core lost to OpenBLAS's spinning threads for the next prompt
            mx.eval(masks)
        return [np.array(m) for m in masks]
    mask, i, j = np.nonzero(straddling)
    windows = low[mask[:, None, None], _band_rows(row_first[i], row_width)[:, :, None],
                  _band_rows(col_first[j], col_width)[:, None, :]]
    values = row_weights[i] @ windows @ col_weights.transpose(0, 2, 1)[j]  # blocks x rows x cols
    height, width = original_size
    results = []
    for t in thresholds:
        out = np.empty((low.shape[0], height, width), bool)
        above = window_min > t  # the blocks whose window is all above t, the rest all at or below
        for r in range(row_blocks):  # written straight at the image's size: the last blocks overhang it
            out[:, r * block_rows : (r + 1) * block_rows] = np.repeat(above[:, r], block_cols, axis=1)[:, None, :width]
        for n, r, c, edge in zip(mask, i, j, values > t):
            block = out[n, r * block_rows : (r + 1) * block_rows, c * block_cols : (c + 1) * block_cols]
            block[...] = edge[: block.shape[0], : block.shape[1]]
        results.append(out.reshape(*batch, height, width))
    return results
