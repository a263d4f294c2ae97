"""LayerNorm and Linear over plain ``nn.LayerNorm`` / ``nn.Linear`` parameters, fast on the CPU.

On a GPU both call the module itself (MLX's fused kernels, ``quantized_matmul`` for a quantized Linear); on
the CPU:
- LayerNorm's mean and variance are matrix products with a 1/C column: MLX's fused CPU layer norm
  and its reductions are several times slower than BLAS's matrix-vector products here;
- a few rows times a large weight go in blocks of output columns that OpenBLAS multiplies in place;
- a quantized Linear's weight is dequantized for each product, which BLAS then multiplies: MLX's CPU
  ``quantized_matmul`` is a plain loop (~300x slower: MobileSAM's encoding took 93 s).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import backend

# OpenBLAS multiplies in place, without first copying ("packing") both operands into blocks, only
# while M N K <= 1e6 and, with the weight transposed as in nn.Linear, the product has at most ~1200
# values (its small-matrix kernels' permit, kernel/x86_64/sgemm_small_kernel_permit_skylakex.c). Measured
# with OpenBLAS only; for another BLAS the blocks are one batched product of the same arithmetic.
_SMALL_PRODUCT_MNK = 1_000_000
_SMALL_PRODUCT_OUTPUT = 1024
_FEW_ROWS = 32  # blocks pay most for a few rows (docs/performance.md)


def layer_norm(norm: nn.LayerNorm, x: mx.array) -> mx.array:
    """``norm(x)`` (affine); on the CPU with the statistics as matrix products, in float32 (returned in x's
    dtype: squares of float16 activations overflow)."""
    if not backend.on_cpu():
        return norm(x)
    x32 = x.astype(mx.float32)
    average = mx.full((x.shape[-1], 1), 1.0 / x.shape[-1])
    centred = x32 - x32 @ average
    variance = (centred * centred) @ average
    return (centred * (mx.rsqrt(variance + norm.eps) * norm.weight) + norm.bias).astype(x.dtype)


def _column_block(rows: int, out_dim: int, in_dim: int) -> int:
    """Output columns per block for ``linear``: all of them, unless a few rows meet a weight too large
    for OpenBLAS's small-matrix kernels; then the largest halving of out_dim whose blocks fit them."""
    block = out_dim
    if rows > _FEW_ROWS or rows * out_dim * in_dim <= _SMALL_PRODUCT_MNK:
        return block
    while block % 2 == 0 and (rows * block > _SMALL_PRODUCT_OUTPUT or rows * block * in_dim > _SMALL_PRODUCT_MNK):
        block //= 2
    return block


def linear(layer: nn.Linear | nn.QuantizedLinear, x: mx.array) -> mx.array:
    """``layer(x)``; on the CPU a few rows times a large weight go in blocks of output columns, and a quantized
    layer's weight is dequantized for BLAS.

    For the mask decoder's prompt tokens (~7 rows), OpenBLAS spends longer packing the token MLP's
    2048 x 256 weights than multiplying; cut into blocks (views, no copies) small enough for its
    small-matrix kernels, the weights are read in place.
    """
    if isinstance(layer, nn.QuantizedLinear):
        if not backend.on_cpu():
            return layer(x)
        weight = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
        y = x @ weight.T
        return y + layer.bias if "bias" in layer else y
    out_dim, in_dim = layer.weight.shape
    rows = x.size // in_dim
    block = _column_block(rows, out_dim, in_dim) if backend.on_cpu() else out_dim
    if block == out_dim:
        return layer(x)
    blocks = x.reshape(rows, in_dim) @ layer.weight.reshape(-1, block, in_dim).swapaxes(1, 2)  # n x rows x block
    y = blocks.swapaxes(0, 1).reshape(*x.shape[:-1], out_dim)
    return y + layer.bias if "bias" in layer else y


def mlp(layers: list[nn.Linear], x: mx.array) -> mx.array:
    """SAM's MLP (Linear layers with ReLU between) through ``linear``."""
    for i, layer in enumerate(layers):
        x = linear(layer, x)
        if i < len(layers) - 1:
            x = nn.relu(x)
    return x
