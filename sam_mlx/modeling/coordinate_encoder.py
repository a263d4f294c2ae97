"""SAM's coordinate encoder: random Fourier features of 2-D positions.

A position (x, y) normalised to 0..1 becomes ``[sin(f), cos(f)]`` with
``f = 2 pi (2 (x, y) - 1) @ G``, where G is a 2 x 128 Gaussian frequency matrix
fixed at training time and loaded from the checkpoint. The same encoder gives the
prompt points/box corners and the image-token grid their position encodings, so
prompts and image tokens live in one positional space.

That space is square, as in training, where every input was a padded square: positions
are divided by the longest side in both axes, so a non-square input (stretch sizing)
covers the top-left part of the unit square, at the original's scale, instead of
being stretched over all of it.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class CoordinateEncoder(nn.Module):
    def __init__(self, num_features: int = 128):
        super().__init__()
        # Filled from the checkpoint; zeros here so a model with unloaded weights is obviously wrong.
        self.gaussian_matrix = mx.zeros((2, num_features))

    def encode(self, xy: mx.array) -> mx.array:
        """xy: ... x 2 in 0..1 (x first) -> ... x 2*num_features."""
        f = (2.0 * xy - 1.0) @ self.gaussian_matrix
        f = 2.0 * math.pi * f
        return mx.concatenate([mx.sin(f), mx.cos(f)], axis=-1)

    def encode_points(self, points: mx.array, image_size: tuple[int, int]) -> mx.array:
        """points: ... x 2 pixel coordinates (x, y) of an image of ``image_size`` (H, W), taken at the
        pixels' centres -> ... x 2*num_features."""
        return self.encode((points + 0.5) * (1.0 / max(image_size)))

    def grid(self, h: int, w: int) -> mx.array:
        """Position encoding of every cell centre of an h x w grid: h x w x 2*num_features."""
        side = max(h, w)
        ys = (np.arange(h, dtype=np.float32) + 0.5) / side
        xs = (np.arange(w, dtype=np.float32) + 0.5) / side
        xy = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)
        return self.encode(mx.array(xy))
