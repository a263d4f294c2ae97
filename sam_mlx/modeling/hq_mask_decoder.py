"""HQ-SAM's mask decoder (SysCV, "Segment Anything in High Quality"): SAM's decoder plus one more output token.

SAM's decoder is kept as it is; HQ-SAM adds
- the HQ token, put after SAM's mask tokens: the two-way transformer updates it with them;
- HQ features, once per image: the encoder's early features (after the ViT's first global-attention block,
  or TinyViT's second stage: fine detail) and the final image tokens (global context), each upscaled 4x by
  two transposed convs and summed, B x 4h x 4w x D/8;
- per prompt, SAM's upscaled image features refined by two 3x3 convs, plus the HQ features: the HQ token,
  through its own MLP, is dotted with every pixel of that sum, giving the HQ mask.

The output mask is SAM's mask (the best of masks 1-3 by predicted IoU with ``multimask_output``, else mask 0)
plus the HQ mask, or the HQ mask alone with ``hq_token_only``: one mask per prompt, as in the original. The
predicted IoU is SAM's, of the SAM mask chosen.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import PromptDecoderConfig
from .common import MLP, layer_norm_2d
from .mask_decoder import MaskDecoder, dot_pixels


class FeatureUpscaler(nn.Module):
    """B x h x w x I -> B x 4h x 4w x O: two 2x2 stride-2 transposed convs with LayerNorm and GELU between."""

    def __init__(self, in_dim: int, mid_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(in_dim, mid_dim, kernel_size=2, stride=2)
        self.norm = layer_norm_2d(mid_dim)
        self.conv2 = nn.ConvTranspose2d(mid_dim, out_dim, kernel_size=2, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv2(nn.gelu(self.norm(self.conv1(x))))


class MaskFeatureRefiner(nn.Module):
    """SAM's upscaled image features, B x 4h x 4w x D/8 -> the same shape: two 3x3 convs, LayerNorm and GELU
    between (the one step of HQ-SAM that mixes neighbouring pixels of the upscaled features)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, 2 * dim, kernel_size=3, padding=1)
        self.norm = layer_norm_2d(2 * dim)
        self.conv2 = nn.Conv2d(2 * dim, dim, kernel_size=3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv2(nn.gelu(self.norm(self.conv1(x))))


class HQMaskDecoder(MaskDecoder):
    def __init__(self, config: PromptDecoderConfig, early_feature_dim: int):
        super().__init__(config)
        d = config.embed_dim
        self.hq_token = mx.zeros((1, d))
        self.hq_mask_mlp = MLP(d, d, d // 8, 3)
        self.early_feature_upscaler = FeatureUpscaler(early_feature_dim, d, d // 8)
        self.image_token_upscaler = FeatureUpscaler(d, d // 4, d // 8)
        self.mask_feature_refiner = MaskFeatureRefiner(d // 8)

    def output_tokens(self) -> mx.array:
        """SAM's output tokens, then the HQ token."""
        return mx.concatenate([self.iou_token, self.mask_tokens, self.hq_token])

    def hq_features(self, image_tokens: mx.array, early_features: mx.array) -> mx.array:
        """An image's HQ features, shared by its prompts: image_tokens 1 x h x w x D and the encoder's
        early features 1 x h x w x E -> 1 x 4h x 4w x D/8."""
        return self.image_token_upscaler(image_tokens) + self.early_feature_upscaler(early_features)

    def __call__(
        self,
        image_tokens: mx.array,
        image_pe: mx.array,
        prompt_tokens: mx.array,
        mask_hint: mx.array | None,
        multimask_output: bool,
        hq_features: mx.array | None = None,
        hq_token_only: bool = False,
    ) -> tuple[mx.array, mx.array]:
        """As ``MaskDecoder``, with the image's ``hq_features`` (``hq_features()``; required) -> low-res logits
        B x 1 x 4h x 4w and IoU predictions B x 1."""
        if hq_features is None:
            raise ValueError("HQ-SAM's mask decoder needs the image's HQ features (from the encoder's early features)")
        m = self.num_mask_tokens
        tokens, image = self.attend(image_tokens, image_pe, prompt_tokens, mask_hint)
        features = self.mask_generator.upscaler(image)  # B x 4h x 4w x D/8
        hq_pixels = self.mask_feature_refiner(features) + hq_features
        sam_weights = mx.stack([mlp(tokens[:, 1 + i]) for i, mlp in enumerate(self.mask_generator.mask_token_mlps)],
                               axis=1)  # B x M x D/8
        hq_weights = self.hq_mask_mlp(tokens[:, 1 + m])[:, None]  # B x 1 x D/8
        sam_masks = dot_pixels(sam_weights, features)  # B x M x 4h x 4w
        hq_mask = dot_pixels(hq_weights, hq_pixels)  # B x 1 x 4h x 4w
        iou = self.iou_mlp(tokens[:, 0])  # B x M

        if multimask_output:  # the best of masks 1..M-1 by predicted IoU
            best = mx.argmax(iou[:, 1:], axis=1) + 1
            sam_mask = mx.take_along_axis(sam_masks, best[:, None, None, None], axis=1)
            iou = mx.take_along_axis(iou, best[:, None], axis=1)
        else:
            sam_mask, iou = sam_masks[:, :1], iou[:, :1]
        return (hq_mask if hq_token_only else sam_mask + hq_mask), iou

