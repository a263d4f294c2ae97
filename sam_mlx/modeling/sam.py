"""The whole SAM model: image encoder, coordinate encoder, prompt encoder and mask decoder.

Images are channels-last. The heavy image encoder runs once per image; the coordinate encoder,
prompt encoder and mask decoder run per prompt. This is the reference model, plain MLX that reads
top to bottom; ``sam_mlx.fast`` computes the same from these modules' parameters, fast on the CPU.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import SamConfig, ViTConfig
from .coordinate_encoder import CoordinateEncoder
from .hq_mask_decoder import HQMaskDecoder
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder, prompt_batch_size
from .tiny_vit import TinyViTImageEncoder


class Sam(nn.Module):
    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        if isinstance(config.encoder, ViTConfig):
            self.image_encoder: ImageEncoderViT | TinyViTImageEncoder = ImageEncoderViT(config.encoder)
        else:
            self.image_encoder = TinyViTImageEncoder(config.encoder)
        d = config.decoder.embed_dim
        self.coordinate_encoder = CoordinateEncoder(d // 2)
        self.prompt_encoder = PromptEncoder(d)
        if config.hq:
            self.mask_decoder: MaskDecoder | HQMaskDecoder = HQMaskDecoder(config.decoder, config.early_feature_dim)
        else:
            self.mask_decoder = MaskDecoder(config.decoder)

    @property
    def encoder_dtype(self) -> mx.Dtype:
        """The image encoder's weight dtype, which it computes in (a quantized encoder's scales')."""
        return next(v.dtype for _, v in tree_flatten(self.image_encoder.parameters())
                    if mx.issubdtype(v.dtype, mx.floating))

    def encode_image(self, image: mx.array) -> mx.array:
        """B x H x W x 3 normalized, padded image -> B x H/16 x W/16 x 256 image tokens (in the encoder's dtype)."""
        return self.image_encoder(image.astype(self.encoder_dtype))

    def encode_image_hq(self, image: mx.array) -> tuple[mx.array, mx.array]:
        """HQ-SAM: ``encode_image`` and the image's HQ features, B x 4h x 4w x D/8 (from the encoder's early
        features and the image tokens; ``HQMaskDecoder.hq_features``), which every prompt's decode needs."""
        if not isinstance(self.mask_decoder, HQMaskDecoder):
            raise ValueError(f"a {self.config.name} model has no HQ mask decoder")
        tokens, early = self.image_encoder.encode(image.astype(self.encoder_dtype), keep_early=True)
        dtype = self.mask_decoder.hq_token.dtype
        return tokens, self.mask_decoder.hq_features(tokens.astype(dtype), early.astype(dtype))

    def encode_prompts(
        self,
        points: tuple[mx.array, mx.array] | None,
        boxes: mx.array | None,
        input_size: tuple[int, int],
        batch: int,
    ) -> mx.array:
        """Points (B x N x 2 pixels, B x N labels) and boxes (B x 4: x1, y1, x2, y2) of the (H, W) encoder input
        -> B x N' x D prompt tokens: each coordinate's encoding plus its role's embedding."""
        encode = self.coordinate_encoder.encode_points
        point_encodings = None if points is None else (encode(points[0], input_size), points[1])
        corner_encodings = None if boxes is None else encode(boxes.reshape(-1, 2, 2), input_size)
        return self.prompt_encoder(point_encodings, corner_encodings, batch)

    def decode(
        self,
        image_tokens: mx.array,
        input_size: tuple[int, int],
        points: tuple[mx.array, mx.array] | None = None,
        boxes: mx.array | None = None,
        mask_input: mx.array | None = None,
        multimask_output: bool = True,
        hq_features: mx.array | None = None,
        hq_token_only: bool = False,
    ) -> tuple[mx.array, mx.array]:
        """Prompts -> (low-res logits B x C x 4h x 4w, IoU predictions B x C).

        image_tokens: 1 x h x w x D; ``input_size``: the (H, W) of the encoder input the prompt coordinates
        are in; points: (B x N x 2 xy, B x N labels); boxes: B x 4; mask_input: B x 4h x 4w logits.
        HQ-SAM: ``hq_features`` from ``encode_image_hq`` (required), ``hq_token_only`` as in the original; C is 1.
        """
        h, w = image_tokens.shape[1:3]
        batch = prompt_batch_size(points, boxes, mask_input)
        prompt_tokens = self.encode_prompts(points, boxes, input_size, batch)
        image_pe = self.coordinate_encoder.grid(h, w)
        mask_hint = None if mask_input is None else mask_input[..., None]
        if isinstance(self.mask_decoder, HQMaskDecoder):
            return self.mask_decoder(image_tokens, image_pe, prompt_tokens, mask_hint, multimask_output, hq_features,
                                     hq_token_only)
        return self.mask_decoder(image_tokens, image_pe, prompt_tokens, mask_hint, multimask_output)
