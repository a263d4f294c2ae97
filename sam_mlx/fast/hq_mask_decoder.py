"""HQ-SAM's mask decoder over ``modeling.hq_mask_decoder``'s parameters, for one image and many prompts.

What differs from the plain forward, with the same result:
- the two-way transformer is the fast path's (``two_way_transformer``: row bands, the image side kept per image,
  a mask hint as a low-rank shift), with the HQ token among the output tokens;
- the 2 x 2 stride-2 transposed convs (SAM's upscaler, the HQ features' two upscalers) are matrix products
  (``mask_decoder.pixel_upscale``), and the mask feature refiner's 3 x 3 convs one product each over the nine
  shifted copies of their input: MLX's own convs are slow on the CPU.
Unlike SAM's fast decoder the masks are computed over the whole grid: the refiner's 3 x 3 convs mix the upscaled
features of neighbouring tokens.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..modeling.hq_mask_decoder import FeatureUpscaler, HQMaskDecoder
from ..modeling.mask_decoder import dot_pixels
from ..ops.bands import row_bands
from ..ops.elementwise import gelu
from ..ops.layers import layer_norm, mlp
from .mask_decoder import MaskHint, pixel_upscale, upscale_in_blocks
from .two_way_transformer import ImageSide, shift_image, two_way_transformer


def _channels_last(blocks: mx.array) -> mx.array:
    """B x h x w x 2 x 2 x 2 x 2 x C (two stride-2 upscales in block layout) -> B x 4h x 4w x C.

    Pixel (4i + 2a + c, 4j + 2b + d) is blocks[:, i, j, a, b, c, d].
    """
    b, h, w = blocks.shape[:3]
    return blocks.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, 4 * h, 4 * w, blocks.shape[-1])


def _feature_upscale(upscaler: FeatureUpscaler, x: mx.array) -> mx.array:
    """``upscaler(x)``: B x h x w x I -> B x 4h x 4w x O."""
    return _channels_last(pixel_upscale(upscaler.conv2, gelu(layer_norm(upscaler.norm, pixel_upscale(upscaler.conv1,
                                                                                                        x)))))


def hq_features(decoder: HQMaskDecoder, image_tokens: mx.array, early_features: mx.array) -> mx.array:
    """``decoder.hq_features(image_tokens, early_features)``: 1 x h x w x D and 1 x h x w x E -> 1 x 4h x 4w x D/8."""
    return (_feature_upscale(decoder.image_token_upscaler, image_tokens)
            + _feature_upscale(decoder.early_feature_upscaler, early_features))


def _conv3x3(conv: nn.Conv2d, x: mx.array) -> mx.array:
    """A 3 x 3 conv with padding 1, B x H x W x I -> B x H x W x O, as one product over the nine shifted inputs."""
    b, h, w, i = x.shape
    padded = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    shifted = mx.concatenate([padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=-1)
    return shifted @ conv.weight.reshape(conv.weight.shape[0], -1).T + conv.bias  # weight: O x 3 x 3 x I


def decode_hq(
    decoder: HQMaskDecoder,
    side: ImageSide,
    image_pe: mx.array,
    prompt_tokens: mx.array,
    hint: MaskHint | None,
    hq_features: mx.array,
    multimask_output: bool,
    hq_token_only: bool,
) -> tuple[mx.array, mx.array]:
    """``decoder(image_tokens, image_pe, prompt_tokens, mask_hint, multimask_output, hq_features, hq_token_only)``
    from the image's kept ``side`` (``mask_decoder.image_side``), lazily: low-res logits B x 1 x 4h x 4w and IoU
    predictions B x 1."""
    b = prompt_tokens.shape[0]
    h, w, d = image_pe.shape
    m = decoder.num_mask_tokens
    out_tokens = decoder.output_tokens()
    tokens = mx.concatenate([mx.broadcast_to(out_tokens[None], (b, *out_tokens.shape)), prompt_tokens], axis=1)
    count = len(side.image)
    if hint is not None:
        side = shift_image(decoder.transformer.layers[0], side, row_bands(hint.features, count), hint.weight,
                           hint.offset)
    tokens, src = two_way_transformer(decoder.transformer, side.image, row_bands(image_pe[None], count), tokens, side,
                                      outputs=list(range(m + 2)))  # the IoU, mask and HQ tokens
    image = mx.concatenate([mx.broadcast_to(band, (b, *band.shape[1:])) for band in src], axis=1).reshape(b, h, w, d)

    features = _channels_last(upscale_in_blocks(decoder, image))  # B x 4h x 4w x D/8
    refiner = decoder.mask_feature_refiner
    hq_pixels = _conv3x3(refiner.conv2, gelu(layer_norm(refiner.norm, _conv3x3(refiner.conv1, features)))) + hq_features
    hq_mask = dot_pixels(mlp(decoder.hq_mask_mlp.layers, tokens[:, 1 + m])[:, None], hq_pixels)
    iou = mlp(decoder.iou_mlp.layers, tokens[:, 0])  # B x M
    chosen = mx.argmax(iou[:, 1:], axis=1) + 1 if multimask_output else mx.zeros((b,), mx.int32)
    iou = mx.take_along_axis(iou, chosen[:, None], axis=1)
    if hq_token_only:
        return hq_mask, iou
    # only the chosen SAM mask token's mask: its MLP picked per prompt
    mask_mlps = decoder.mask_generator.mask_token_mlps
    sam_weights = mx.stack([mlp(mask_mlps[i].layers, tokens[:, 1 + i]) for i in range(m)], axis=1)  # B x M x D/8
    weights = mx.take_along_axis(sam_weights, chosen[:, None, None], axis=1)
    return dot_pixels(weights, features) + hq_mask, iou
