"""The mask decoder over ``modeling.mask_decoder``'s parameters, for one image and many prompts.

What differs from the plain forward, with the same result:
- the image side of the first transformer layer is kept per image (``project_image``); a mask hint
  shifts it by a low-rank term (``MaskHint``) instead of a full dense embedding;
- the image tokens go through in row bands (``ops.bands``), on the CPU one per core;
- the mask upscaler's transposed convs are matrix products, kept in block layout until the final masks;
- only the chosen mask tokens' masks are computed, optionally only for the top-left tokens the
  post-processing reads (``read_grid``);
- on the CPU, a batch's prompts are decoded one after another, so one prompt's tensors stay in cache.
"""

from __future__ import annotations

from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..modeling.mask_decoder import MaskDecoder, MaskHintEncoder
from ..ops import backend, bands
from ..ops.bands import across_rows, per_band, row_bands, top_left_bands
from ..ops.elementwise import gelu
from ..ops.layers import layer_norm, mlp
from .two_way_transformer import ImageSide, project_image, shift_image, two_way_transformer

# On the CPU, prompts are decoded this many at a time, each group after the last: a prompt carries
# 4096 x 256 image-side floats through the transformer, and one prompt's stay in cache; MLX evaluates
# independent groups interleaved, which would put all of them in flight at once.
_CPU_PROMPT_GROUP = 1
# On a GPU, prompts are decoded in groups whose activations stay within this many bytes: segment everything's
# 64 prompts took 1.8 GB at once, 0.29 GB in these groups (measured through the GPU branches on dog.jpg).
_GPU_DECODE_BYTES = 256 << 20
# bytes of activations a prompt takes per image token and channel: measured ~28 MB a prompt for 64 x 64 x 256
# float32 tokens through the GPU branches, i.e. ~7 floats (``tests/test_gpu_memory.py``)
_GPU_BYTES_PER_TOKEN_CHANNEL = 28


class MaskHint(NamedTuple):
    """A mask hint's dense embedding as its change from the "no mask" embedding, factored:
    dense = no_mask + features @ weight + offset.

    The hint encoder ends in a 1 x 1 conv from k = mask_in_chans (16) channels, so the change has
    rank k plus a constant, and the first transformer layer projects it k wide instead of D wide
    (``two_way_transformer.shift_image``). features: B x h x w x k, weight: k x D, offset: D.
    """

    features: mx.array
    weight: mx.array
    offset: mx.array


def _hint_features(encoder: MaskHintEncoder, mask: mx.array) -> mx.array:
    """B x 4h x 4w x 1 -> B x h x w x mask_in_chans: the hint encoder before its final 1 x 1 conv."""
    x = gelu(layer_norm(encoder.norm1, encoder.conv1(mask)))
    return gelu(layer_norm(encoder.norm2, encoder.conv2(x)))


def mask_hint(decoder: MaskDecoder, masks: mx.array) -> MaskHint:
    """masks: B x 4h x 4w x 1 -> their dense embedding as a change from "no mask" (``MaskHint``)."""
    encoder = decoder.mask_hint_encoder
    b, rows, cols, _ = masks.shape
    # each token's features come from its own 4 x 4 mask pixels: computed in row bands, in parallel
    features = across_rows(lambda m: _hint_features(encoder, m.reshape(b, -1, cols, 1)),
                           masks.reshape(b, rows // 4, 4, cols, 1))
    project = encoder.conv3  # weight: D x 1 x 1 x k
    weight = project.weight.reshape(project.weight.shape[0], -1).T
    return MaskHint(features, weight, project.bias - encoder.no_mask_embedding[0])


def image_side(decoder: MaskDecoder, image_tokens: mx.array, image_pe: mx.array) -> ImageSide:
    """What the first transformer layer computes from the image alone, for prompts without a mask hint.

    image_tokens: 1 x h x w x D, image_pe: h x w x D. The result is in as many bands as ``bands.band_count()``
    gives now; decodes with it use the same.
    """
    count = bands.band_count()
    no_mask = decoder.mask_hint_encoder.no_mask_embedding
    src = per_band(lambda band: band + no_mask, row_bands(image_tokens, count))
    return project_image(decoder.transformer.layers[0], src, row_bands(image_pe[None], count))


def pixel_upscale(conv: nn.ConvTranspose2d, x: mx.array) -> mx.array:
    """A 2x2 stride-2 transposed conv as one matrix product: ... x I -> ... x 2 x 2 x O, each input pixel's
    2 x 2 output block kept apart (its block axes are turned into rows and columns once, on the final masks)."""
    o, _, _, i = conv.weight.shape
    y = x @ conv.weight.transpose(3, 1, 2, 0).reshape(i, 4 * o)
    return y.reshape(*x.shape[:-1], 2, 2, o) + conv.bias


def upscale_in_blocks(decoder: MaskDecoder, x: mx.array) -> mx.array:
    """The image upscaler, pixel-local, in block layout: B x h x w x D -> B x h x w x 2 x 2 x 2 x 2 x D/8
    (axes: coarse row and column offset, then the fine ones)."""
    upscaler = decoder.mask_generator.upscaler
    return gelu(pixel_upscale(upscaler.conv2, gelu(layer_norm(upscaler.norm, pixel_upscale(upscaler.conv1, x)))))


def interleave_blocks(blocks: mx.array) -> mx.array:
    """B x h x w x 2 x 2 x 2 x 2 x C (from ``upscale_in_blocks``) -> B x C x 4h x 4w.

    Pixel (4i + 2a + c, 4j + 2b + d) is blocks[:, i, j, a, b, c, d].
    """
    b, h, w = blocks.shape[:3]
    return blocks.transpose(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, blocks.shape[-1], 4 * h, 4 * w)


def prompt_group(grid_shape: tuple[int, ...]) -> int:
    """How many prompts ``decode`` computes at once over an h x w x D token grid: one on the CPU (cache-sized);
    on a GPU as many as fit ``_GPU_DECODE_BYTES`` of activations (at least one)."""
    if backend.on_cpu():
        return _CPU_PROMPT_GROUP
    h, w, d = grid_shape
    return max(1, _GPU_DECODE_BYTES // (_GPU_BYTES_PER_TOKEN_CHANNEL * h * w * d))


def decode(
    decoder: MaskDecoder,
    side: ImageSide,
    image_pe: mx.array,
    prompt_tokens: mx.array,
    hint: MaskHint | None,
    multimask_output: bool,
    read_grid: tuple[int, int] | None = None,
) -> tuple[mx.array, mx.array]:
    """``decoder(image_tokens, image_pe, prompt_tokens, mask_hint, multimask_output)`` from the image's kept
    ``side`` (``image_side``), lazily.

    image_pe: h x w x D; prompt_tokens: B x N x D; hint: the prompts' mask hints (``mask_hint``) or None.
    ``read_grid``: (rows, cols) to compute the masks of the top-left rows x cols tokens only (the mask
    generator is per token, so those equal the full masks' part); the whole grid if None.
    Returns low-res logits B x C x 4 rows x 4 cols and IoU predictions B x C.
    """
    b = prompt_tokens.shape[0]
    group = prompt_group(image_pe.shape)
    if b > group:
        groups: list[tuple[mx.array, mx.array]] = []
        for i in range(0, b, group):
            part = slice(i, i + group)
            prompts = [prompt_tokens[part]] + ([] if hint is None else [hint.features[part]])
            if groups:  # start after the previous group
                prompts = mx.depends(prompts, list(groups[-1]))
            part_hint = None if hint is None else hint._replace(features=prompts[1])
            groups.append(decode(decoder, side, image_pe, prompts[0], part_hint, multimask_output, read_grid))
        return mx.concatenate([m for m, _ in groups]), mx.concatenate([q for _, q in groups])
    h, w, d = image_pe.shape
    out_tokens = mx.concatenate([decoder.iou_token, decoder.mask_tokens], axis=0)
    tokens = mx.concatenate([mx.broadcast_to(out_tokens[None], (b, *out_tokens.shape)), prompt_tokens], axis=1)
    count = len(side.image)
    pos = row_bands(image_pe[None], count)
    if hint is not None:
        side = shift_image(decoder.transformer.layers[0], side, row_bands(hint.features, count), hint.weight,
                           hint.offset)

    chosen = range(1, decoder.num_mask_tokens) if multimask_output else range(1)
    # the IoU token, then the chosen mask tokens: the other tokens' final attention is never read
    tokens, src = two_way_transformer(decoder.transformer, side.image, pos, tokens, side,
                                      outputs=[0, *(1 + i for i in chosen)])
    mask_token_mlps = decoder.mask_generator.mask_token_mlps
    # B x d/8 x C: each chosen mask token through its MLP
    hyper = mx.stack([mlp(mask_token_mlps[i].layers, tokens[:, 1 + j]) for j, i in enumerate(chosen)], axis=2)

    rows, cols = read_grid or (h, w)

    def band_masks(band: mx.array) -> mx.array:  # B x n x D -> B x n/cols x cols x 2 x 2 x 2 x 2 x C
        features = upscale_in_blocks(decoder, band.reshape(b, -1, cols, d))  # ... x 2 x 2 x 2 x 2 x d/8
        masks = features.reshape(b, -1, features.shape[-1]) @ hyper
        return masks.reshape(*features.shape[:-1], len(chosen))

    masks = interleave_blocks(mx.concatenate(per_band(band_masks, top_left_bands(src, w, rows, cols)), axis=1))
    return masks, mlp(decoder.iou_mlp.layers, tokens[:, 0])[:, chosen.start : chosen.stop]
