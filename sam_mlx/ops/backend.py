"""The one device switch: which branches sam_mlx's kernels take, and the CPU's buffer cache.

Every kernel that computes differently on the CPU asks ``backend.on_cpu()`` through this module
(never a copy of the name), so a test emulates a GPU by patching this one function.
"""

from __future__ import annotations

import os

import mlx.core as mx

# A prompt's decode and mask upscaling free ~125 MB of temporaries; MLX keeps freed buffers for reuse
# only up to its cache limit (32 MiB on the CPU), and past it they go back to the OS and come back as
# fresh, page-faulted memory on the next prompt (docs/performance.md).
_CPU_BUFFER_CACHE = 256 << 20


def device_from_environment() -> None:
    """Make ``SAM_MLX_DEVICE`` (``cpu`` or ``gpu``), if set, MLX's default device: e.g. the tests' float32 CPU
    references on a Mac (``tests/conftest.py``), or a comparison with the CPU (``scripts/device_check.py``)."""
    choice = os.environ.get("SAM_MLX_DEVICE", "").strip().lower()
    if not choice:
        return
    if choice not in ("cpu", "gpu"):
        raise ValueError(f"SAM_MLX_DEVICE must be cpu or gpu, got {choice!r}")
    if choice == "gpu" and not mx.is_available(mx.gpu):
        raise ValueError("SAM_MLX_DEVICE=gpu, but MLX has no GPU here (mlx on Apple Silicon, mlx[cuda] on Linux)")
    mx.set_default_device(mx.cpu if choice == "cpu" else mx.gpu)


def on_cpu() -> bool:
    """Whether MLX computes on the CPU, where sam_mlx uses its own CPU kernels (``sam_mlx.ops``)."""
    return mx.default_device() == mx.cpu


def keep_prompt_buffers() -> None:
    """Raise MLX's buffer cache on the CPU so every prompt reuses the last one's buffers (never lowers it)."""
    if on_cpu():
        previous = mx.set_cache_limit(_CPU_BUFFER_CACHE)
        if previous > _CPU_BUFFER_CACHE:
            mx.set_cache_limit(previous)
