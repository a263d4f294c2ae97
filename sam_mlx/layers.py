"""Small building blocks shared by several SAM components."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class MLP(nn.Module):
    """Stack of Linear layers with ReLU in between (SAM's hypernetwork and IoU heads).

    Shapes: ``(..., input_dim) -> (..., output_dim)``.
    """

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


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as ``torch.nn.GELU()`` in the original."""
    return nn.gelu(x)
