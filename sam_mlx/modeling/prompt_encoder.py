"""SAM's prompt encoder: points, boxes and a mask hint -> sparse and dense prompt embeddings.

Sparse: each point or box corner is its coordinate encoding plus a learned embedding
of its role (background point, foreground point, box top-left, box bottom-right);
padding points (label -1) carry only the "not a point" embedding.
Dense: a low-res mask hint (4x the token grid) is downscaled by a small conv stack to the
token grid; without a hint a learned "no mask" embedding is broadcast.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..config import PromptDecoderConfig
from .coordinate_encoder import CoordinateEncoder
from ..ops.layers import gelu, layer_norm_2d
from ..ops.bands import across_rows

BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 0, 1, 2, 3
PADDING_LABEL = -1


class MaskHint(NamedTuple):
    """A mask hint's dense embedding as its change from the "no mask" embedding, factored:
    dense = no_mask + features @ weight + offset.

    The hint encoder ends in a 1 x 1 conv from k = mask_in_chans (16) channels, so the change
    has rank k plus a constant, and the mask decoder projects it k wide instead of embed_dim
    wide (``TwoWayAttentionBlock.shift_image``). features: B x h x w x k, weight: k x D, offset: D.
    """

    features: mx.array
    weight: mx.array
    offset: mx.array


class MaskHintEncoder(nn.Module):
    """B x 4h x 4w x 1 mask logits -> B x h x w x embed_dim (two stride-2 convs, then 1x1)."""

    def __init__(self, embed_dim: int, mask_in_chans: int):
        super().__init__()
        mid = mask_in_chans // 4
        self.conv1 = nn.Conv2d(1, mid, kernel_size=2, stride=2)
        self.norm1 = layer_norm_2d(mid)
        self.conv2 = nn.Conv2d(mid, mask_in_chans, kernel_size=2, stride=2)
        self.norm2 = layer_norm_2d(mask_in_chans)
        self.conv3 = nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1)

    def features(self, mask: mx.array) -> mx.array:
        """B x 4h x 4w x 1 -> B x h x w x mask_in_chans: everything before the final 1 x 1 conv."""
        x = gelu(self.norm1(self.conv1(mask)))
        return gelu(self.norm2(self.conv2(x)))

    def __call__(self, mask: mx.array) -> mx.array:
        return self.conv3(self.features(mask))


class PromptEncoder(nn.Module):
    def __init__(self, config: PromptDecoderConfig):
        super().__init__()
        d = config.embed_dim
        self.coordinate_encoder = CoordinateEncoder(d // 2)
        # Rows: background, foreground, box top-left, box bottom-right.
        self.point_embeddings = mx.zeros((4, d))
        self.not_a_point_embed = mx.zeros((1, d))
        self.mask_hint_encoder = MaskHintEncoder(d, config.mask_in_chans)
        self.no_mask_embed = mx.zeros((1, d))

    def embed_points(self, points: mx.array, labels: mx.array, pad: bool, input_size: tuple[int, int]) -> mx.array:
        """points: B x N x 2 pixels of the encoder input, labels: B x N -> B x N(+1) x D.

        ``pad`` appends a padding point, as the original does when no box is given, so the
        decoder always sees the token layout it was trained with.
        """
        points = points + 0.5  # pixel centres
        if pad:
            b = points.shape[0]
            points = mx.concatenate([points, mx.zeros((b, 1, 2), points.dtype)], axis=1)
            labels = mx.concatenate([labels, mx.full((b, 1), PADDING_LABEL, labels.dtype)], axis=1)
        pe = self.coordinate_encoder.encode_points(points, input_size)
        is_pad = (labels == PADDING_LABEL)[..., None]
        role = self.point_embeddings[mx.clip(labels, 0, 1).astype(mx.int32)]
        return mx.where(is_pad, self.not_a_point_embed, pe + role)

    def embed_boxes(self, boxes: mx.array, input_size: tuple[int, int]) -> mx.array:
        """boxes: B x 4 (x1, y1, x2, y2) pixels of the encoder input -> B x 2 x D corner tokens."""
        corners = boxes.reshape(-1, 2, 2) + 0.5
        pe = self.coordinate_encoder.encode_points(corners, input_size)
        return pe + self.point_embeddings[BOX_TOP_LEFT : BOX_BOTTOM_RIGHT + 1]

    def mask_hint(self, masks: mx.array) -> MaskHint:
        """masks: B x 4h x 4w x 1 -> their dense embedding as a change from "no mask" (``MaskHint``)."""
        b, rows, cols, _ = masks.shape
        # each token's features come from its own 4 x 4 mask pixels: computed in row bands, in parallel
        features = across_rows(lambda m: self.mask_hint_encoder.features(m.reshape(b, -1, cols, 1)),
                               masks.reshape(b, rows // 4, 4, cols, 1))
        project = self.mask_hint_encoder.conv3  # weight: D x 1 x 1 x k
        weight = project.weight.reshape(project.weight.shape[0], -1).T
        return MaskHint(features, weight, project.bias - self.no_mask_embed[0])

    def embed_sparse(
        self, points: tuple[mx.array, mx.array] | None, boxes: mx.array | None, input_size: tuple[int, int], batch: int
    ) -> mx.array:
        """Points (B x N x 2 pixels, B x N labels) and boxes (B x 4) -> B x N' x D sparse embeddings
        (B x 0 x D for ``batch`` prompts with neither)."""
        parts = []
        if points is not None:
            parts.append(self.embed_points(points[0], points[1], pad=boxes is None, input_size=input_size))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes, input_size))
        return mx.concatenate(parts, axis=1) if parts else mx.zeros((batch, 0, self.no_mask_embed.shape[-1]))

    def embed_dense(self, masks: mx.array | None, batch: int, grid_size: tuple[int, int]) -> mx.array:
        """Mask hints (B x 4h x 4w x 1) or, without them, "no mask" for ``batch`` prompts -> B x h x w x D."""
        if masks is not None:
            return self.mask_hint_encoder(masks)
        d = self.no_mask_embed.shape[-1]
        return mx.broadcast_to(self.no_mask_embed.reshape(1, 1, 1, d), (batch, *grid_size, d))

    def __call__(
        self,
        points: tuple[mx.array, mx.array] | None,
        boxes: mx.array | None,
        masks: mx.array | None,
        input_size: tuple[int, int],
        grid_size: tuple[int, int],
    ) -> tuple[mx.array, mx.array]:
        """Returns sparse B x N x D and dense B x h x w x D embeddings.

        ``input_size`` is the (H, W) the coordinates are in (the padded encoder input),
        ``grid_size`` the token grid (h, w); ``masks`` is B x 4h x 4w x 1 when given.
        """
        batch = prompt_batch_size(points, boxes, masks)
        return self.embed_sparse(points, boxes, input_size, batch), self.embed_dense(masks, batch, grid_size)


def prompt_batch_size(points: tuple[mx.array, mx.array] | None, boxes: mx.array | None, masks: mx.array | None) -> int:
    """B of prompts given as (B x N x 2, B x N) points, B x 4 boxes and/or B x ... masks (which agree); 1 if none."""
    for given in (None if points is None else points[0], boxes, masks):
        if given is not None:
            return given.shape[0]
    return 1
