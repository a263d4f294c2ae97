"""SAM's mask decoder: image tokens + prompt tokens -> 4 candidate masks and their predicted IoU.

- the mask hint encoder turns a low-res mask from an earlier prediction (or, without one, the learned
  "no mask" embedding) into one embedding per image token, added to the image tokens;
- learned output tokens (one IoU token, four mask tokens) are put before the prompt tokens, and the
  two-way transformer updates them and the image tokens;
- the mask generator upscales the image tokens 4x (two transposed convs) and dots every upscaled pixel
  with each mask token, passed through its own MLP: one candidate mask per mask token;
- the IoU MLP turns the IoU token into each candidate's predicted mask quality.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import PromptDecoderConfig
from .common import MLP, layer_norm_2d
from .two_way_transformer import TwoWayTransformer


class MaskHintEncoder(nn.Module):
    """B x 4h x 4w x 1 mask logits -> B x h x w x D, added to the image tokens (two stride-2 convs, then a 1x1);
    without a mask, the learned "no mask" embedding on every token."""

    def __init__(self, dim: int, mask_in_chans: int):
        super().__init__()
        mid = mask_in_chans // 4
        self.conv1 = nn.Conv2d(1, mid, kernel_size=2, stride=2)
        self.norm1 = layer_norm_2d(mid)
        self.conv2 = nn.Conv2d(mid, mask_in_chans, kernel_size=2, stride=2)
        self.norm2 = layer_norm_2d(mask_in_chans)
        self.conv3 = nn.Conv2d(mask_in_chans, dim, kernel_size=1)
        self.no_mask_embedding = mx.zeros((1, dim))

    def __call__(self, mask: mx.array | None, grid: tuple[int, int], batch: int) -> mx.array:
        """``batch`` masks B x 4h x 4w x 1, or None (no hint) -> B x h x w x D."""
        if mask is None:
            d = self.no_mask_embedding.shape[-1]
            return mx.broadcast_to(self.no_mask_embedding.reshape(1, 1, 1, d), (batch, *grid, d))
        x = nn.gelu(self.norm1(self.conv1(mask)))
        x = nn.gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class ImageUpscaler(nn.Module):
    """B x h x w x D image tokens -> B x 4h x 4w x D/8 features: two 2x2 stride-2 transposed convs,
    LayerNorm and GELU between, GELU after."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2)
        self.norm = layer_norm_2d(dim // 4)
        self.conv2 = nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return nn.gelu(self.conv2(nn.gelu(self.norm(self.conv1(x)))))


class MaskGenerator(nn.Module):
    """Image tokens and mask tokens -> one mask per mask token: the upscaled image features dotted with
    each mask token's MLP output."""

    def __init__(self, dim: int, num_mask_tokens: int):
        super().__init__()
        self.upscaler = ImageUpscaler(dim)
        self.mask_token_mlps = [MLP(dim, dim, dim // 8, 3) for _ in range(num_mask_tokens)]

    def __call__(self, image: mx.array, mask_tokens: mx.array) -> mx.array:
        """image: B x h x w x D, mask_tokens: B x M x D -> masks B x M x 4h x 4w."""
        features = self.upscaler(image)  # B x 4h x 4w x D/8
        weights = mx.stack([mlp(mask_tokens[:, i]) for i, mlp in enumerate(self.mask_token_mlps)], axis=1)
        return dot_pixels(weights, features)


def dot_pixels(weights: mx.array, features: mx.array) -> mx.array:
    """weights B x K x C, features B x H x W x C -> B x K x H x W: each weight vector dotted with every pixel."""
    b, h, w, c = features.shape
    return (weights @ features.reshape(b, h * w, c).swapaxes(1, 2)).reshape(b, -1, h, w)


class MaskDecoder(nn.Module):
    def __init__(self, config: PromptDecoderConfig):
        super().__init__()
        d = config.embed_dim
        self.num_mask_tokens = config.num_multimask_outputs + 1
        self.iou_token = mx.zeros((1, d))
        self.mask_tokens = mx.zeros((self.num_mask_tokens, d))
        self.mask_hint_encoder = MaskHintEncoder(d, config.mask_in_chans)
        self.transformer = TwoWayTransformer(config.transformer_depth, d, config.transformer_heads,
                                             config.transformer_mlp_dim)
        self.mask_generator = MaskGenerator(d, self.num_mask_tokens)
        self.iou_mlp = MLP(d, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth)

    def __call__(
        self,
        image_tokens: mx.array,
        image_pe: mx.array,
        prompt_tokens: mx.array,
        mask_hint: mx.array | None,
        multimask_output: bool,
    ) -> tuple[mx.array, mx.array]:
        """image_tokens: 1 x h x w x D (one image, shared by the B prompts); image_pe: their h x w x D position
        encoding; prompt_tokens: B x N x D; mask_hint: B x 4h x 4w x 1 low-res logits, or None.

        Returns low-res logits B x C x 4h x 4w and IoU predictions B x C, where C is 3 (masks 1..3) with
        ``multimask_output`` and 1 (mask 0) without, as in the original.
        """
        tokens, image = self.attend(image_tokens, image_pe, prompt_tokens, mask_hint)
        masks = self.mask_generator(image, tokens[:, 1 : 1 + self.num_mask_tokens])
        iou = self.iou_mlp(tokens[:, 0])
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou[:, chosen]

    def output_tokens(self) -> mx.array:
        """The learned output tokens put before the prompt tokens: the IoU token, then the mask tokens."""
        return mx.concatenate([self.iou_token, self.mask_tokens])

    def attend(
        self, image_tokens: mx.array, image_pe: mx.array, prompt_tokens: mx.array, mask_hint: mx.array | None
    ) -> tuple[mx.array, mx.array]:
        """The two-way transformer on [output tokens, prompt tokens] and the image tokens plus the mask hint's
        embedding -> (tokens B x N x D, image B x h x w x D)."""
        b = prompt_tokens.shape[0]
        h, w, d = image_pe.shape
        output_tokens = self.output_tokens()
        tokens = mx.concatenate([mx.broadcast_to(output_tokens, (b, *output_tokens.shape)), prompt_tokens], axis=1)
        image = image_tokens + self.mask_hint_encoder(mask_hint, (h, w), b)  # B x h x w x D
        tokens, image = self.transformer(image, image_pe, tokens)
        return tokens, image.reshape(b, h, w, d)
