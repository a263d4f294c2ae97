"""``FastSam``: the one entry to the fast path, over a ``modeling.Sam``'s parameters.

The predictor and the automatic mask generator run SAM through it. It computes what the plain
model computes (``Sam.encode_image``, ``Sam.decode``, ``transforms.upscale_masks``), checked equal
to it by the tests, with what makes it fast on MLX's CPU backend (docs/performance.md):

- per image: the encoder in row bands with chunked attention (``image_encoder``, ``tiny_vit``), and
  the mask decoder's per-image side kept for every prompt (``mask_decoder.image_side``);
- per prompt: the decoder from that side, in bands, with reassociated attention, optionally only for
  the tokens the post-processing reads (``mask_decoder.decode``);
- mask post-processing band by band, and for binary masks only at their edges (``masks``).

Work is evaluated with the bands' streams in parallel and OpenBLAS on one thread (``ops.bands``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from ..modeling.image_encoder import ImageEncoderViT
from ..modeling.prompt_encoder import prompt_batch_size
from ..modeling.sam import Sam
from ..modeling.tiny_vit import TinyViTImageEncoder
from ..ops.backend import keep_prompt_buffers
from ..ops.bands import parallel_bands
from ..ops.blas import single_threaded
from ..transforms import ImageGeometry, preprocess
from .hq_mask_decoder import decode_hq, hq_features
from .image_encoder import vit_features
from .mask_decoder import MaskHint, decode, image_side, mask_hint
from .masks import upscale_mask_logits, upscaled_masks_above
from .tiny_vit import tiny_vit_features
from .two_way_transformer import ImageSide

# The fast version of each image encoder (the image tokens and, if asked, the early features HQ-SAM fuses);
# another encoder runs as the plain model has it.
_FAST_ENCODERS = {ImageEncoderViT: vit_features, TinyViTImageEncoder: tiny_vit_features}
# HQ-SAM's prompts are decoded this many at a time: each carries 4h x 4w x 288 floats through the refiner's convs.
_HQ_PROMPT_GROUP = 4


class EncodedImage(NamedTuple):
    """An image as the fast path keeps it for its prompts."""

    tokens: mx.array  # 1 x h x w x C image tokens
    geometry: ImageGeometry
    grid_pe: mx.array  # h x w x D: the token grid's position encoding
    side: ImageSide  # the first decoder layer's per-image projections, in row bands
    hq_features: mx.array | None = None  # HQ-SAM: 1 x 4h x 4w x D/8 (``HQMaskDecoder.hq_features``)


class FastSam:
    """SAM for one image and many prompts, fast; ``model`` stays the plain reference it reads its weights from."""

    def __init__(self, model: Sam):
        self.model = model
        keep_prompt_buffers()

    def encode(self, pixels: mx.array) -> mx.array:
        """``model.encode_image(pixels)``, evaluated: B x H x W x 3 normalized, padded input -> B x h x w x 256."""
        return self._encode(pixels, keep_early=False)[0]

    def encode_hq(self, pixels: mx.array) -> tuple[mx.array, mx.array]:
        """``model.encode_image_hq(pixels)``, evaluated: HQ-SAM's image tokens and HQ features."""
        tokens, early = self._encode(pixels, keep_early=True)
        decoder = self.model.mask_decoder
        dtype = decoder.hq_token.dtype
        with parallel_bands():
            features = hq_features(decoder, tokens.astype(dtype), early.astype(dtype))
            mx.eval(features)
        return tokens, features

    def _encode(self, pixels: mx.array, keep_early: bool) -> tuple[mx.array, mx.array | None]:
        encoder = self.model.image_encoder
        encode = _FAST_ENCODERS.get(type(encoder), lambda plain, x, keep: plain.encode(x, keep))
        with parallel_bands():
            tokens, early = encode(encoder, pixels.astype(self.model.encoder_dtype), keep_early)
            mx.eval(tokens, early)
        return tokens, early

    def prepare(self, tokens: mx.array, geometry: ImageGeometry, hq_features: mx.array | None = None) -> EncodedImage:
        """An image's tokens (1 x h x w x C) with what every prompt on it shares, evaluated. HQ-SAM needs the
        image's ``hq_features`` (``encode_hq``)."""
        if self.model.config.hq and hq_features is None:
            raise ValueError("HQ-SAM needs the image's HQ features, made from the encoder's early features, "
                             "which image tokens alone do not hold: encode the image (set_image)")
        grid_pe = self.model.coordinate_encoder.grid(*geometry.grid_size)
        with parallel_bands():
            side = image_side(self.model.mask_decoder, tokens, grid_pe)
            mx.eval(grid_pe, side)
        return EncodedImage(tokens, geometry, grid_pe, side, hq_features)

    def encode_image(self, image: np.ndarray, geometry: ImageGeometry) -> EncodedImage:
        """H x W x 3 uint8 RGB, sized and padded as ``geometry`` says -> ``prepare`` of its tokens."""
        pixels = preprocess(image, geometry)
        if self.model.config.hq:
            tokens, hq_features = self.encode_hq(pixels)
            return self.prepare(tokens, geometry, hq_features)
        return self.prepare(self.encode(pixels), geometry)

    def decode(
        self,
        image: EncodedImage,
        points: tuple[mx.array, mx.array] | None,
        boxes: mx.array | None,
        masks: mx.array | None,
        multimask_output: bool,
        read_grid_only: bool = False,
        hq_token_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``model.decode`` on the image's tokens, evaluated: prompts in encoder-input pixels (points: B x N x 2
        with B x N labels, boxes: B x 4, masks: B x 4h x 4w logits) -> numpy (low-res logits B x C x 4h x 4w,
        IoU predictions B x C).

        ``read_grid_only``: the low-res logits of ``geometry.read_grid``'s tokens only, all that ``upscale``
        and ``masks_above`` read (a 3:2 photo's padding is a third of the tokens).
        HQ-SAM: C is 1 and ``hq_token_only`` as in the original; always the whole grid's logits.
        """
        model, geometry = self.model, image.geometry
        with parallel_bands():
            batch = prompt_batch_size(points, boxes, masks)
            prompt_tokens = model.encode_prompts(points, boxes, geometry.padded_size, batch)
            hint = None if masks is None else mask_hint(model.mask_decoder, masks[..., None])
            if model.config.hq:
                return self._decode_hq(image, prompt_tokens, hint, multimask_output, hq_token_only)
            read_grid = geometry.read_grid if read_grid_only else None
            low_res, iou = decode(model.mask_decoder, image.side, image.grid_pe, prompt_tokens, hint, multimask_output,
                                  read_grid)
            mx.eval(low_res, iou)
        return np.array(low_res), np.array(iou)

    def _decode_hq(
        self, image: EncodedImage, prompt_tokens: mx.array, hint: MaskHint | None, multimask_output: bool,
        hq_token_only: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """HQ-SAM's ``decode`` of B prompts (B x N x D tokens, their hints), ``_HQ_PROMPT_GROUP`` at a time."""
        low_res, iou = [], []
        for start in range(0, prompt_tokens.shape[0], _HQ_PROMPT_GROUP):
            part = slice(start, start + _HQ_PROMPT_GROUP)
            group = decode_hq(self.model.mask_decoder, image.side, image.grid_pe, prompt_tokens[part],
                              None if hint is None else hint._replace(features=hint.features[part]), image.hq_features,
                              multimask_output, hq_token_only)
            mx.eval(group)
            low_res.append(np.array(group[0]))
            iou.append(np.array(group[1]))
        return np.concatenate(low_res), np.concatenate(iou)

    def upscale(self, image: EncodedImage, low_res: np.ndarray) -> np.ndarray:
        """``transforms.upscale_masks``: ... x h x w low-res logits (whole grid, or ``decode(read_grid_only=True)``'s
        part) -> ... x H x W logits at the image's size."""
        g = _low_res_geometry(image.geometry, low_res.shape)
        with single_threaded():
            return np.array(upscale_mask_logits(mx.array(low_res), g.padded_size, g.input_size, g.original_size))

    def masks_above(self, image: EncodedImage, low_res: np.ndarray, thresholds: Sequence[float]) -> list[np.ndarray]:
        """``upscale(image, low_res) > t`` for each threshold t: bool ... x H x W masks, interpolated only at
        their edges."""
        g = _low_res_geometry(image.geometry, low_res.shape)
        return upscaled_masks_above(low_res, g.padded_size, g.input_size, g.original_size, thresholds)


def _low_res_geometry(geometry: ImageGeometry, shape: Sequence[int]) -> ImageGeometry:
    """The geometry of low-res logits shaped ... x h x w: those of the top-left h/4 x w/4 tokens, from
    ``read_grid`` to the whole grid, upscale as the encoder input's top-left 4h x 4w pixels."""
    size = tuple(shape[-2:])
    low, high = (tuple(4 * t for t in grid) for grid in (geometry.read_grid, geometry.grid_size))
    if len(shape) < 2 or not all(a <= s <= b and s % 4 == 0 for a, s, b in zip(low, size, high)):
        raise ValueError(f"low-res logits must be ... x {high[0]} x {high[1]} for this image "
                         f"(or its read part, ... x {low[0]} x {low[1]}), got shape {tuple(shape)}")
    return ImageGeometry(geometry.original_size, geometry.input_size, (4 * size[0], 4 * size[1]))
