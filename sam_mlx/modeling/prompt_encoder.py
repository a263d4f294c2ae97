"""SAM's prompt encoder: encoded points and box corners -> prompt tokens.

Each point or box corner arrives as its coordinate encoding (``CoordinateEncoder``); the prompt
encoder adds the learned embedding of its role: foreground point, background point, box top-left,
box bottom-right. Padding points (label -1) carry only the learned "not a point" embedding; one is
appended to points given without a box, as in the original, so the decoder sees the token layout
it was trained with. (The mask hint, a prompt in the original's prompt encoder, is encoded by the
mask decoder's ``MaskHintEncoder``.)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

BACKGROUND, FOREGROUND = 0, 1
PADDING_LABEL = -1


class PromptEncoder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.background_embedding = mx.zeros((1, dim))
        self.foreground_embedding = mx.zeros((1, dim))
        self.box_top_left_embedding = mx.zeros((1, dim))
        self.box_bottom_right_embedding = mx.zeros((1, dim))
        self.not_a_point_embedding = mx.zeros((1, dim))

    def __call__(
        self, points: tuple[mx.array, mx.array] | None, box_corners: mx.array | None, batch: int
    ) -> mx.array:
        """points: (encodings B x N x D, labels B x N); box_corners: the encodings of each box's top-left
        and bottom-right corner, B x 2 x D -> B x N' x D prompt tokens (B x 0 x D for ``batch`` prompts
        with neither)."""
        tokens = []
        if points is not None:
            encodings, labels = points
            labels = labels[..., None]
            role = mx.where(labels == FOREGROUND, self.foreground_embedding, self.background_embedding)
            tokens.append(mx.where(labels == PADDING_LABEL, self.not_a_point_embedding, encodings + role))
            if box_corners is None:
                padding = self.not_a_point_embedding
                tokens.append(mx.broadcast_to(padding, (labels.shape[0], *padding.shape)))
        if box_corners is not None:
            corners = mx.concatenate([self.box_top_left_embedding, self.box_bottom_right_embedding])
            tokens.append(box_corners + corners)
        if not tokens:
            return mx.zeros((batch, 0, self.not_a_point_embedding.shape[-1]))
        return mx.concatenate(tokens, axis=1)


def prompt_batch_size(points: tuple[mx.array, mx.array] | None, boxes: mx.array | None, masks: mx.array | None) -> int:
    """B of prompts given as (B x N x 2, B x N) points, B x 4 boxes and/or B x ... masks (which agree); 1 if none."""
    for given in (None if points is None else points[0], boxes, masks):
        if given is not None:
            return given.shape[0]
    return 1
