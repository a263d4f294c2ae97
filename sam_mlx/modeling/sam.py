"""The whole SAM model: image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..config import SamConfig
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder, prompt_batch_size
from .two_way_transformer import ImageSide

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """SAM v1. Images are channels-last; the heavy encoder runs once per image, the decoder per prompt."""

    def __init__(self, config: SamConfig):
        super().__init__()
        self.config = config
        if config.encoder.kind == "vit":
            self.image_encoder = ImageEncoderViT(config.encoder)
        else:
            from .tiny_vit import TinyViTImageEncoder

            self.image_encoder = TinyViTImageEncoder(config.encoder)
        self.prompt_encoder = PromptEncoder(config.decoder)
        self.mask_decoder = MaskDecoder(config.decoder)

    def encode_image(self, image: mx.array) -> mx.array:
        """B x H x W x 3 normalized, padded image -> B x H/16 x W/16 x 256 image tokens.

        The image is cast to the encoder's weight dtype, so a half-precision encoder
        computes in half precision; the tokens come back in that dtype.
        """
        _, weight = tree_flatten(self.image_encoder.parameters())[0]
        return self.image_encoder(image.astype(weight.dtype))

    def decode(
        self,
        image_tokens: mx.array,
        input_size: tuple[int, int],
        points: tuple[mx.array, mx.array] | None = None,
        boxes: mx.array | None = None,
        mask_input: mx.array | None = None,
        multimask_output: bool = True,
        image_pe: mx.array | None = None,
        image_side: ImageSide | None = None,
        read_grid: tuple[int, int] | None = None,
    ) -> tuple[mx.array, mx.array]:
        """Prompts -> (low-res logits B x C x 4h x 4w, IoU predictions B x C).

        image_tokens: 1 x h x w x D; ``input_size``: the (H, W) of the encoder input the
        prompt coordinates are expressed in; points: (B x N x 2 xy, B x N labels);
        boxes: B x 4; mask_input: B x 4h x 4w logits. ``image_pe`` (the token grid's
        position encoding, h x w x D) and ``image_side`` (``project_image``) are per-image results
        the caller may keep. ``read_grid``: (rows, cols) for the low-res logits of the top-left
        rows x cols tokens only, 4 rows x 4 cols (``MaskDecoder``).
        """
        grid = image_tokens.shape[1:3]
        masks = None if mask_input is None else mask_input[..., None]
        batch = prompt_batch_size(points, boxes, masks)
        sparse = self.prompt_encoder.embed_sparse(points, boxes, input_size, batch)
        if image_pe is None:
            image_pe = self.prompt_encoder.coordinate_encoder.grid(*grid)
        if image_side is None:
            dense, hint = self.prompt_encoder.embed_dense(masks, batch, grid), None
        else:  # the kept image side stands for "no mask"; a mask hint shifts it by a low-rank change
            dense, hint = None, None if masks is None else self.prompt_encoder.mask_hint(masks)
        return self.mask_decoder(image_tokens, image_pe, sparse, dense, multimask_output, image_side, read_grid, hint)

    def project_image(self, image_tokens: mx.array, image_pe: mx.array) -> ImageSide:
        """The mask decoder's per-image work for every prompt (1 x h x w x D tokens); a mask hint shifts it."""
        return self.mask_decoder.project_image(image_tokens, image_pe, self.prompt_encoder.no_mask_embed)
