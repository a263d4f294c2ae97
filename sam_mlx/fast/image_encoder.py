"""The ViT image encoder over ``modeling.image_encoder``'s parameters, fast on the CPU.

What differs from the plain forward, with the same result: the per-token work (LayerNorm, the qkv and
output projections, the MLP, residuals) runs in row bands, one per core (``ops.bands.across_rows``);
attention is ``ops.attention``, in cache-sized chunks dealt out to the same streams with the
relative-position term added per chunk; LayerNorm and GELU are ``ops``' CPU kernels.
"""

from __future__ import annotations

import mlx.core as mx

from ..modeling.common import ChannelProjection
from ..modeling.image_encoder import Block, ImageEncoderViT, window_partition, window_unpartition
from ..ops.attention import attention
from ..ops.bands import across_rows
from ..ops.elementwise import gelu
from ..ops.layers import layer_norm, linear


def _attention(block: Block, qkv: mx.array) -> mx.array:
    """The attention between the projections: qkv B x H x W x 3C (``attn.qkv`` of the tokens) -> B x H x W x C,
    before ``attn.proj``; its chunks are spread over the bands' streams."""
    attn = block.attn
    b, h, w, c = qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
    q, k, v = attn.split_qkv(qkv)
    rel_pos = attn.relative_position_terms(q, h, w) if attn.use_rel_pos else None
    out = attention(q, k, v, attn.scale, rel_pos=rel_pos, spread=True)
    return out.transpose(0, 2, 1, 3).reshape(b, h, w, c)


def _residual_and_mlp(block: Block, shortcut: mx.array, attended: mx.array) -> mx.array:
    x = shortcut + linear(block.attn.proj, attended)
    mlp = block.mlp
    return x + linear(mlp.lin2, gelu(linear(mlp.lin1, layer_norm(block.norm2, x))))


def _block(block: Block, x: mx.array) -> mx.array:
    """``block(x)``: B x H x W x C -> B x H x W x C, every core working on every step."""
    if block.window_size > 0:
        size = (x.shape[1], x.shape[2])
        norm = across_rows(lambda t: layer_norm(block.norm1, t), x)
        windows, padded = window_partition(norm, block.window_size)  # padded after the norm
        attended = _attention(block, across_rows(lambda t: linear(block.attn.qkv, t), windows))
        attended = window_unpartition(attended, block.window_size, padded, size)
    else:
        attended = _attention(block, across_rows(lambda t: linear(block.attn.qkv, layer_norm(block.norm1, t)), x))
    return across_rows(lambda s, a: _residual_and_mlp(block, s, a), x, attended)


def channel_projection(projection: ChannelProjection, x: mx.array) -> mx.array:
    """``projection(x)`` with ``ops``' LayerNorm (also TinyViT's)."""
    return layer_norm(projection.norm2, projection.conv2(layer_norm(projection.norm1, projection.conv1(x))))


def encode_vit(encoder: ImageEncoderViT, image: mx.array) -> mx.array:
    """``encoder(image)``: B x H x W x 3 -> B x H/16 x W/16 x 256."""
    return vit_features(encoder, image, keep_early=False)[0]


def vit_features(encoder: ImageEncoderViT, image: mx.array, keep_early: bool) -> tuple[mx.array, mx.array | None]:
    """``encoder.encode(image, keep_early)``: the image tokens and, with ``keep_early``, the first stage's output."""
    x = encoder.position_encoding(encoder.patch_embedding(image))
    early = None
    for i, stage in enumerate(encoder.stages):
        for block in stage.blocks:
            x = _block(block, x)
        if keep_early and i == 0:
            early = x
    return channel_projection(encoder.channel_projection, x), early
