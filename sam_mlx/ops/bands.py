"""Image tokens cut into bands of rows, one per CPU core, each computed on its own MLX stream.

MLX's CPU backend runs each op on one core (BLAS aside), so the other cores idle through
every elementwise op, norm and softmax: most of a prompt's decode (~700 ops over 4096 x 256
image tokens) and over half of an encoding. But most of that work is per token: projections,
residuals, LayerNorm, MLPs, the mask upscaler. So that work runs in row bands, each on its own
MLX stream, and every CPU stream has its own thread:

- the fast mask decoder keeps the image tokens as bands from start to end; only the prompt -> image
  attention spans all tokens, and each band computes its part of it, joined from small per-band
  results (``attention.banded_attention``);
- the fast image encoders run their per-token layers ``across_rows`` and deal the independent chunks
  of their attention (windows, heads, query rows) out to the same streams (``chunk_streams``).

OpenBLAS serialises concurrent multi-threaded calls, so bands pay off with BLAS single-threaded
while they are evaluated: ``parallel_bands`` sets that up. On a GPU, or with one core, there is
one band on the default stream and everything computes as it would without bands.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx

from . import backend, blas
from .threads import this_thread

# one band per core up to this many (measured on 2 cores only: docs/performance.md)
_MAX_BANDS = 8


def band_count() -> int:
    """How many row bands the image tokens are cut into: 1 on a GPU; on the CPU, ``SAM_MLX_BANDS`` if set
    (1 turns bands off, and BLAS keeps its threads), else the cores (capped)."""
    if not backend.on_cpu():
        return 1
    choice = os.environ.get("SAM_MLX_BANDS", "").strip()
    if choice:
        if not choice.isdigit() or int(choice) < 1:
            raise ValueError(f"SAM_MLX_BANDS must be a whole number of bands, 1 or more, got {choice!r}")
        return int(choice)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, _MAX_BANDS))


def band_streams(count: int) -> list[mx.Stream]:
    """The calling thread's default stream for band 0, then one CPU stream (thread) per further band, made once
    per calling thread: MLX streams work only in the thread that made them (``threads``)."""
    extra = this_thread().streams
    while len(extra) < count - 1:
        extra.append(mx.new_stream(mx.cpu))
    return [mx.default_stream(mx.default_device()), *extra[: count - 1]]


def chunk_streams(spread: bool) -> list[mx.Stream]:
    """Streams to deal independent chunks of work out to: every band's with ``spread``, else the current one."""
    return band_streams(band_count() if spread else 1)


def per_band(fn: Callable[..., Any], *bands: list[Any]) -> list[Any]:
    """[fn(a_i, b_i, ...) for each band i], band i's ops on band i's stream."""
    results = []
    for stream, args in zip(band_streams(len(bands[0])), zip(*bands, strict=True)):
        with mx.stream(stream):
            results.append(fn(*args))
    return results


def _band_bounds(rows: int, count: int) -> list[int]:
    """The first row of each of ``count`` (at most ``rows``) bands of rows, as even as can be, then ``rows``."""
    count = min(count, rows)
    return [rows * i // count for i in range(count + 1)]


def _split_rows(grid: mx.array, count: int) -> list[mx.array]:
    """B x h x ... -> ``count`` (at most h) bands of consecutive rows, as even as can be."""
    return mx.split(grid, _band_bounds(grid.shape[1], count)[1:-1], axis=1)


def row_bands(grid: mx.array, count: int) -> list[mx.array]:
    """B x h x w x C token grid -> ``count`` (at most h) bands of whole rows, each flattened to B x (h_i w) x C."""
    b, _, _, c = grid.shape
    return [band.reshape(b, -1, c) for band in _split_rows(grid, count)]


def top_left_bands(bands: list[mx.array], width: int, rows: int, cols: int) -> list[mx.array]:
    """The top-left rows x cols tokens of a B x h x w x C grid held in row bands (B x (h_i w) x C each),
    cut again into as many bands of whole rows (at most ``rows``), as even as can be: B x (rows_i cols) x C each.

    Each new band is gathered on its own band's stream. The whole grid gives back ``bands`` unchanged.
    """
    b, _, c = bands[0].shape
    grids = [band.reshape(b, -1, width, c) for band in bands]
    if (rows, cols) == (sum(g.shape[1] for g in grids), width):
        return bands
    starts = list(itertools.accumulate((g.shape[1] for g in grids), initial=0))
    bounds = _band_bounds(rows, len(bands))

    def gather(first: int, stop: int) -> mx.array:
        overlapping = [(g, s) for g, s in zip(grids, starts) if s < stop and s + g.shape[1] > first]
        pieces = [g[:, max(first - s, 0) : stop - s, :cols] for g, s in overlapping]
        return (pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)).reshape(b, -1, c)

    return per_band(gather, bounds[:-1], bounds[1:])


def across_rows(fn: Callable[..., mx.array], *grids: mx.array) -> mx.array:
    """fn(*grids) for a per-token fn of B x h x ... grids, computed in ``band_count()`` row bands."""
    count = band_count()
    if count == 1:
        return fn(*grids)
    return mx.concatenate(per_band(fn, *(_split_rows(g, count) for g in grids)), axis=1)


@contextlib.contextmanager
def parallel_bands() -> Iterator[None]:
    """Evaluate banded work inside this block: BLAS is single-threaded meanwhile, when there are bands.

    With two bands on 2 cores and OpenBLAS at its usual 2 threads, a decode is slower than with one band;
    single-threaded, bands pay off (docs/performance.md). The fast path (``sam_mlx.fast``) evaluates the
    encoders and the decoder inside it.
    """
    if band_count() == 1:
        yield
        return
    with blas.single_threaded():
        yield
