"""Layers and interpolation shared by several SAM components."""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class MLP(nn.Module):
    """Linear layers with ReLU between (the mask token MLPs and the IoU MLP): (..., in) -> (..., out)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]

    def __call__(self, x: mx.array) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = nn.relu(x)
        return x


def layer_norm_2d(dims: int) -> nn.LayerNorm:
    """SAM's LayerNorm2d: a LayerNorm over channels, which channels-last makes a plain LayerNorm."""
    return nn.LayerNorm(dims, eps=1e-6)


class ChannelProjection(nn.Module):
    """An image encoder's last part ("neck"): 1x1 conv to ``out_chans``, LayerNorm, 3x3 conv, LayerNorm."""

    def __init__(self, dim: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, out_chans, kernel_size=1, bias=False)
        self.norm1 = layer_norm_2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.norm2 = layer_norm_2d(out_chans)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


def linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D linear interpolation, half-pixel centres: for each output sample, the two input samples
    it reads (lo, hi) and the weight of hi (float64; lo's is 1 - that)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, src - lo


@lru_cache(maxsize=256)
def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 matrix of 1-D linear interpolation, half-pixel centres.

    Row i holds the weights of input samples for output sample i, as
    ``torch.nn.functional.interpolate(mode="linear"/"bilinear", align_corners=False)``. A bilinear
    resize is separable, ``out = Ry @ x @ Rx.T``: as matrix products it composes (two resizes and a
    crop become one matrix per axis) and needs no gather.
    """
    lo, hi, frac = linear_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix.astype(np.float32)
