"""Load a system OpenBLAS into the process before MLX, on Linux.

The Linux `mlx[cpu]` wheel bundles a reference BLAS that multiplies matrices
about 60x slower than OpenBLAS. When a shared OpenBLAS is loaded with
RTLD_GLOBAL *before* mlx is imported, MLX's BLAS calls bind to it instead.
Set ``SAM_MLX_OPENBLAS=0`` to turn this off, or to a path to choose the library.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: Path of the BLAS library loaded by this module, or None (bundled/Accelerate).
loaded_blas: str | None = None
_library: ctypes.CDLL | None = None
# open ``single_threaded`` blocks across threads, and OpenBLAS's thread count before the first
_blocks_lock = threading.Lock()
_single_threaded_blocks = 0
_threads_before = 1


def load_system_blas() -> str | None:
    """Load OpenBLAS globally if on Linux, present, and not disabled; return its path."""
    global loaded_blas, _library
    if loaded_blas is not None or not sys.platform.startswith("linux"):
        return loaded_blas
    choice = os.environ.get("SAM_MLX_OPENBLAS", "1")
    if choice.lower() in ("0", "false", "no", "off"):
        return None
    if "mlx.core" in sys.modules:  # too late: MLX has already bound its BLAS
        return None
    paths = _CANDIDATES if choice.lower() in ("1", "true", "yes", "on") else (choice,)
    for path in paths:
        if os.path.exists(path):
            try:
                _library = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_blas = path
            break
    return loaded_blas


def reference_blas_in_use() -> bool:
    """True on Linux when MLX multiplies with the reference BLAS its wheel bundles (no OpenBLAS loaded)."""
    return sys.platform.startswith("linux") and loaded_blas is None


def blas_description() -> str:
    """Human-readable name of the BLAS MLX uses on this machine."""
    if sys.platform == "darwin":
        return "Apple Accelerate"
    if loaded_blas:
        return f"OpenBLAS ({loaded_blas})"
    return "bundled reference BLAS (slow; install libopenblas0-pthread)"


def set_threads(count: int) -> None:
    """Let the loaded OpenBLAS use ``count`` threads, process-wide (without a loaded OpenBLAS, nothing changes)."""
    if _library is not None:
        _library.openblas_set_num_threads(count)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the loaded OpenBLAS on one thread inside the block (process-wide), then restore its thread count.

    For work that MLX already spreads over the cores with its own streams, and for small products between
    prompts: after a multi-threaded product OpenBLAS's worker threads spin for a while (~0.1 s) before they
    sleep, taking a core from whatever runs next (docs/performance.md).
    Blocks may overlap (several predictors in several threads): the first one in sets one thread, the last
    one out restores the count. Without a loaded OpenBLAS (bundled BLAS, Accelerate), nothing changes.
    """
    if _library is None:
        yield
        return
    global _single_threaded_blocks, _threads_before
    with _blocks_lock:
        if _single_threaded_blocks == 0:
            _threads_before = _library.openblas_get_num_threads()
            _library.openblas_set_num_threads(1)
        _single_threaded_blocks += 1
    try:
        yield
    finally:
        with _blocks_lock:
            _single_threaded_blocks -= 1
            if _single_threaded_blocks == 0:
                _library.openblas_set_num_threads(_threads_before)
