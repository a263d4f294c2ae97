"""Row bands on their own streams, and OpenBLAS's thread count while they run."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from sam_mlx.ops import backend, bands, blas


@pytest.mark.parametrize("count,rows,cols", [(2, 5, 4), (3, 7, 2), (3, 2, 5), (2, 1, 1), (4, 7, 5)])
def test_top_left_bands_recut_the_part_evenly(count, rows, cols):
    grid = mx.arange(2 * 7 * 5 * 3).reshape(2, 7, 5, 3)
    recut = bands.top_left_bands(bands.row_bands(grid, count), 5, rows, cols)
    count = min(count, rows)
    assert [b.shape[1] // cols for b in recut] == [rows * (i + 1) // count - rows * i // count for i in range(count)]
    joined = np.concatenate([np.array(b).reshape(2, -1, cols, 3) for b in recut], axis=1)
    np.testing.assert_array_equal(joined, np.array(grid)[:, :rows, :cols])


def test_band_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAM_MLX_BANDS", "3")
    assert bands.band_count() == (3 if backend.on_cpu() else 1)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("SAM_MLX_BANDS", bad)
        if backend.on_cpu():
            with pytest.raises(ValueError, match=f"SAM_MLX_BANDS .*got '{bad}'"):
                bands.band_count()
    monkeypatch.setenv("SAM_MLX_BANDS", "1")
    library = blas._library
    if library is not None:  # one band: BLAS keeps its threads
        threads = library.openblas_get_num_threads()
        with bands.parallel_bands():
            assert library.openblas_get_num_threads() == threads


def test_row_bands_are_whole_rows_capped_at_the_rows():
    grid = mx.arange(2 * 3 * 2).reshape(2, 3, 2, 1)
    rows = bands.row_bands(grid, 5)
    assert [b.shape for b in rows] == [(2, 2, 1)] * 3
    assert np.array_equal(np.concatenate([np.array(b) for b in rows], axis=1), np.array(grid).reshape(2, 6, 1))
    assert [b.shape[1] for b in bands.row_bands(grid, 2)] == [2, 4]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sam_mlx loads OpenBLAS on Linux only")
def test_single_threaded_blas_restores_the_thread_count(monkeypatch):
    library = blas._library
    assert library is not None, "no system OpenBLAS loaded (install libopenblas0-pthread)"
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with blas.single_threaded():
                assert library.openblas_get_num_threads() == 1
                raise RuntimeError("inside")
        assert library.openblas_get_num_threads() == 2
        first, second = blas.single_threaded(), blas.single_threaded()  # overlapping, as from two threads
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert library.openblas_get_num_threads() == 1  # the second block is still open
        second.__exit__(None, None, None)
        assert library.openblas_get_num_threads() == 2
        monkeypatch.setattr(bands, "band_count", lambda: 1)  # one band: BLAS keeps its threads
        with bands.parallel_bands():
            assert library.openblas_get_num_threads() == 2
        monkeypatch.setattr(bands, "band_count", lambda: 2)
        with bands.parallel_bands():
            assert library.openblas_get_num_threads() == 1
    finally:
        library.openblas_set_num_threads(before)
