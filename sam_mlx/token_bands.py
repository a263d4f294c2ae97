"""The mask decoder's image side cut into bands of token rows, one per CPU core.

MLX's CPU backend runs each op on one core (BLAS aside), so a prompt's decode, some 700 ops
over the 4096 x 256 image tokens, leaves the other cores idle. Nearly all of that work is per
image token: projections, residuals, LayerNorm, the image -> prompt attention and the mask
upscaler. Only the prompt -> image attention's softmax spans every token, and its logits are
small (prompt tokens x heads x HW). So the decoder keeps the image tokens as row bands and
computes each band on its own MLX stream, and each CPU stream has its own thread.

OpenBLAS serialises concurrent multi-threaded calls, so the bands only pay off with BLAS
single-threaded while they are evaluated: ``parallel_decoding`` sets that up. On a GPU, or with
one core, there is one band on the default stream and the decoder computes as before.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from . import _blas
from .layers import on_cpu

# Bands are measured on 2 cores only (2 bands: a prompt's decode ~34 -> ~27 ms); more cores get
# more bands, up to this many.
_MAX_BANDS = 8
_extra_streams: list[mx.Stream] = []


def band_count() -> int:
    """How many bands the decoder cuts the image tokens into: the CPU cores (capped), or 1 on a GPU."""
    if not on_cpu():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, _MAX_BANDS))


def _streams(count: int) -> list[mx.Stream]:
    """The default stream for band 0, then one CPU stream (thread) per further band, made once."""
    while len(_extra_streams) < count - 1:
        _extra_streams.append(mx.new_stream(mx.cpu))
    return [mx.default_stream(mx.default_device()), *_extra_streams[: count - 1]]


def row_bands(grid: mx.array, count: int) -> list[mx.array]:
    """B x h x w x C token grid -> ``count`` (at most h) bands of whole rows, as even as can be, each
    flattened to B x (h_i w) x C tokens."""
    b, h, _, c = grid.shape
    count = min(count, h)
    return [band.reshape(b, -1, c) for band in mx.split(grid, [h * i // count for i in range(1, count)], axis=1)]


def per_band(fn: Callable[..., Any], *bands: list[Any]) -> list[Any]:
    """[fn(a_i, b_i, ...) for each band i], band i's ops on band i's stream."""
    results = []
    for stream, args in zip(_streams(len(bands[0])), zip(*bands, strict=True)):
        with mx.stream(stream):
            results.append(fn(*args))
    return results


@contextlib.contextmanager
def parallel_decoding() -> Iterator[None]:
    """Evaluate banded decodes inside this block: BLAS is single-threaded meanwhile, when there are bands.

    With two bands on 2 cores and OpenBLAS at its usual 2 threads, a decode is slower than with one band
    (~38 against ~34 ms); single-threaded, ~27 ms.
    """
    if band_count() == 1:
        yield
        return
    with _blas.single_threaded():
        yield
