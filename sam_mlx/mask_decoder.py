"""SAM's mask decoder: image tokens + prompt embeddings -> 4 candidate masks and their IoU scores.

Learned output tokens (one IoU token, four mask tokens) are prepended to the prompt
tokens and run through the two-way transformer with the image tokens. The image
tokens are then upscaled 4x by two transposed convolutions (the mask generator), and
each mask token, passed through its own hypernetwork MLP, is dot-multiplied with every
upscaled pixel to give that candidate's logits. An MLP on the IoU token predicts each
candidate's mask quality.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import PromptDecoderConfig
from .layers import MLP, gelu, layer_norm_2d
from .two_way_transformer import TwoWayTransformer


class PixelUpscale2x(nn.Module):
    """A 2x2, stride-2 transposed convolution: B x h x w x I -> B x 2h x 2w x O.

    Each input pixel independently paints a 2 x 2 output block, so the layer is one
    matmul to I -> 4*O channels and a reshuffle; MLX's general transposed conv is
    many times slower on the CPU. Weight layout as ``nn.ConvTranspose2d``: O x 2 x 2 x I.
    """

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.weight = mx.zeros((out_chans, 2, 2, in_chans))
        self.bias = mx.zeros((out_chans,))

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, i = x.shape
        o = self.weight.shape[0]
        y = x @ self.weight.transpose(3, 1, 2, 0).reshape(i, 4 * o)  # B x h x w x (2 * 2 * O)
        y = y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)
        return y + self.bias


class MaskUpscaler(nn.Module):
    """B x h x w x D -> B x 4h x 4w x D/8 (two stride-2 transposed convs)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = PixelUpscale2x(dim, dim // 4)
        self.norm = layer_norm_2d(dim // 4)
        self.conv2 = PixelUpscale2x(dim // 4, dim // 8)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu(self.conv2(gelu(self.norm(self.conv1(x)))))


class MaskDecoder(nn.Module):
    def __init__(self, config: PromptDecoderConfig):
        super().__init__()
        d = config.embed_dim
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = mx.zeros((1, d))
        self.mask_tokens = mx.zeros((self.num_mask_tokens, d))
        self.transformer = TwoWayTransformer(
            config.transformer_depth, d, config.transformer_heads, config.transformer_mlp_dim
        )
        self.upscaler = MaskUpscaler(d)
        self.hypernetworks = [MLP(d, d, d // 8, 3) for _ in range(self.num_mask_tokens)]
        self.iou_head = MLP(d, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)

    def __call__(
        self,
        image_tokens: mx.array,
        image_pe: mx.array,
        sparse: mx.array,
        dense: mx.array,
        multimask_output: bool,
    ) -> tuple[mx.array, mx.array]:
        """Decode masks.

        image_tokens: 1 x h x w x D (one image, shared by the B prompts) or B x h x w x D;
        image_pe: h x w x D; sparse: B x N x D; dense: B x h x w x D.
        Returns low-res logits B x C x 4h x 4w and IoU predictions B x C, where C is 3
        (masks 1..3) with ``multimask_output`` and 1 (mask 0) without, as in the original.
        """
        b = sparse.shape[0]
        _, h, w, d = dense.shape
        out_tokens = mx.concatenate([self.iou_token, self.mask_tokens], axis=0)
        tokens = mx.concatenate([mx.broadcast_to(out_tokens[None], (b, *out_tokens.shape)), sparse], axis=1)
        src = (image_tokens + dense).reshape(b, h * w, d)
        pos = mx.broadcast_to(image_pe.reshape(1, h * w, d), (b, h * w, d))

        tokens, src = self.transformer(src, pos, tokens)
        iou_out = tokens[:, 0]
        mask_out = tokens[:, 1 : 1 + self.num_mask_tokens]

        upscaled = self.upscaler(src.reshape(b, h, w, d))  # B x 4h x 4w x d/8
        hyper = mx.stack([mlp(mask_out[:, i]) for i, mlp in enumerate(self.hypernetworks)], axis=1)
        masks = hyper @ upscaled.reshape(b, -1, upscaled.shape[-1]).transpose(0, 2, 1)
        masks = masks.reshape(b, self.num_mask_tokens, 4 * h, 4 * w)
        iou = self.iou_head(iou_out)

        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]
