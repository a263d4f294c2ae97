"""Small building blocks shared by several SAM components."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .mlx_threads import compiled


def on_cpu() -> bool:
    """Whether MLX computes on the CPU, where sam_mlx uses its own CPU-friendly kernels."""
    return mx.default_device() == mx.cpu


# OpenBLAS multiplies in place, without first copying ("packing") both operands into blocks, only
# while M N K <= 1e6 and, with the weight transposed as in nn.Linear, the product has at most ~1200
# values (its small-matrix kernels' permit, kernel/x86_64/sgemm_small_kernel_permit_skylakex.c). Measured
# with OpenBLAS only; for another BLAS the blocks are one batched product of the same arithmetic.
_SMALL_PRODUCT_MNK = 1_000_000
_SMALL_PRODUCT_OUTPUT = 1024
_FEW_ROWS = 32  # blocks pay most for a few rows: 256 -> 2048 on 64 rows is ~8% faster in blocks, on 256 not


def _column_block(rows: int, out_dim: int, in_dim: int) -> int:
    """Output columns per block for ``Linear``: all of them, unless a few rows meet a weight too large
    for OpenBLAS's small-matrix kernels; then the largest halving of out_dim whose blocks fit them."""
    block = out_dim
    if rows > _FEW_ROWS or rows * out_dim * in_dim <= _SMALL_PRODUCT_MNK:
        return block
    while block % 2 == 0 and (rows * block > _SMALL_PRODUCT_OUTPUT or rows * block * in_dim > _SMALL_PRODUCT_MNK):
        block //= 2
    return block


class Linear(nn.Linear):
    """``nn.Linear`` (same weights); on the CPU a few rows times a large weight go in blocks of output columns.

    For the mask decoder's prompt tokens (~7 rows), OpenBLAS spends longer packing the token MLP's
    2048 x 256 weights than multiplying: 0.68 ms for the MLP against 0.23 ms with the weights cut into
    blocks (views, no copies) small enough for its small-matrix kernels, which read them in place.
    """

    def __call__(self, x: mx.array) -> mx.array:
        out_dim, in_dim = self.weight.shape
        rows = x.size // in_dim
        block = _column_block(rows, out_dim, in_dim) if on_cpu() else out_dim
        if block == out_dim:
            return super().__call__(x)
        blocks = x.reshape(rows, in_dim) @ self.weight.reshape(-1, block, in_dim).swapaxes(1, 2)  # n x rows x block
        y = blocks.swapaxes(0, 1).reshape(*x.shape[:-1], out_dim)
        return y + self.bias if "bias" in self else y


class MLP(nn.Module):
    """Stack of Linear layers with ReLU in between (SAM's hypernetwork and IoU heads).

    Shapes: ``(..., input_dim) -> (..., output_dim)``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = [Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x: mx.array) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.relu(x)
        return x


# MLX keeps freed buffers for reuse only up to its cache limit, 32 MiB on the CPU. A prompt's
# decode and mask upscaling free ~125 MB of temporaries, which past that limit go back to the
# OS and come back as fresh pages on the next prompt: at 1800 x 1200, 25k page faults and
# ~90 ms per prompt instead of ~55 ms with the buffers kept.
_CPU_BUFFER_CACHE = 256 << 20


def keep_prompt_buffers() -> None:
    """Raise MLX's buffer cache on the CPU so every prompt reuses the last one's buffers (never lowers it)."""
    if on_cpu():
        previous = mx.set_cache_limit(_CPU_BUFFER_CACHE)
        if previous > _CPU_BUFFER_CACHE:
            mx.set_cache_limit(previous)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (affine); on the CPU the mean and variance are matmuls with a 1/C column.

    MLX's fused CPU layer norm is ~3x slower for the encoder's rows (4096 x 768: 28 ms
    against 6 ms here), and its CPU reductions run at ~1.2 G values/s against BLAS's
    matrix-vector products (4096 x 256 rows: 2.5 ms with ``mean``, 1.8 ms with matmuls).
    On a GPU the fused kernel is kept. On the CPU the statistics and result are float32
    (returned in x's dtype): squares of float16 activations overflow.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if not on_cpu():
            return super().__call__(x)
        x32 = x.astype(mx.float32)
        average = mx.full((x.shape[-1], 1), 1.0 / x.shape[-1])
        centred = x32 - x32 @ average
        variance = (centred * centred) @ average
        return (centred * (mx.rsqrt(variance + self.eps) * self.weight) + self.bias).astype(x.dtype)


def layer_norm_2d(dims: int) -> LayerNorm:
    """SAM's LayerNorm2d: a LayerNorm over channels, which channels-last makes a plain LayerNorm."""
    return LayerNorm(dims, eps=1e-6)


# Rational minimax approximation of erf on [-4, 4] (as in Eigen's float erf): z * P(z^2) / Q(z^2),
# within 5e-7 of erf; outside the range erf is +-1 to float precision.
_ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
          -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
_ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
          -1.45660718464996e-05)


def fused(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``mlx_threads.compiled(fn)`` for elementwise chains, made to keep its inputs' buffers on the CPU.

    MLX lets a fused kernel write its output over a temporary input ("donation"). On the
    CPU the generated loop then reads and writes the same memory, its runtime alias check
    fails and it runs unvectorised, ~2.5x slower (GELU on 2M values: 8.4 ms against 3.5 ms).
    Making the output depend on the inputs keeps them alive until the kernel has run.
    """
    compiled_fn = compiled(fn)

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        out = compiled_fn(*args)
        if not on_cpu():
            return out
        return mx.depends(out, [a for a in args if isinstance(a, mx.array)])

    return call


def estrin(coeffs: tuple[float, ...], t: mx.array) -> mx.array:
    """sum_i coeffs[i] * t^i, evaluated pairwise (Estrin's scheme).

    The graph is shallower than Horner's chain, so mx.compile fuses it into fewer kernels
    (about 1.5x faster on CPU).
    """
    terms: list[Any] = list(coeffs)
    while len(terms) > 1:
        pairs = [terms[i : i + 2] for i in range(0, len(terms), 2)]
        terms = [p[0] + p[1] * t if len(p) == 2 else p[0] for p in pairs]
        t = t * t
    return terms[0]


# the float32 x (4 sqrt(2) rounded up) for which x * sqrt(0.5) is exactly 4.0 in float32, where the
# approximation reaches +-1 exactly, so GELU(x) is exactly 0 for every x far below zero
_ERF_RANGE_X = 5.6568546


@fused
def _gelu_of_clipped(x: mx.array, clipped: mx.array) -> mx.array:
    z = clipped * math.sqrt(0.5)
    z2 = z * z
    return 0.5 * x * (1.0 + z * estrin(_ERF_P, z2) / estrin(_ERF_Q, z2))


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU to ~2e-6, as ``torch.nn.GELU()``; ~10x faster than ``nn.gelu`` on CPU.

    MLX's CPU erf is a scalar library call (~30 ns per value); this is a vectorised rational
    function. Evaluated in float32 (the powers of x^2 overflow float16), returned in x's dtype.
    """
    x32 = x if x.dtype == mx.float32 else x.astype(mx.float32)
    # x clipped to where erf(x / sqrt(2)) is approximated, by a plain MLX op: inside a fused CPU kernel,
    # MLX's float min/max test every element for NaN and keep the loop from vectorising (~3x slower)
    out = _gelu_of_clipped(x32, mx.clip(x32, -_ERF_RANGE_X, _ERF_RANGE_X))
    return out if x.dtype == mx.float32 else out.astype(x.dtype)
