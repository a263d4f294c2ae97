"""MobileSAM's TinyViT encoder over ``modeling.tiny_vit``'s parameters, fast on the CPU.

What differs from the plain forward, with the same result: 1x1 convs are matrix products and depthwise
convs k*k fused shifted multiply-adds (both several times faster than MLX's convs on the CPU); the
per-token work runs in row bands, one per core, and the window attention is ``ops.attention``, its chunks
dealt out to the same streams; LayerNorm and GELU are ``ops``' CPU kernels.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..modeling.tiny_vit import (
    MBConv,
    PatchMerging,
    TinyViTBlock,
    TinyViTImageEncoder,
    WindowAttention,
    check_input,
    window_partition,
    window_unpartition,
)
from ..ops.attention import attention
from ..ops.bands import across_rows
from ..ops.elementwise import gelu
from ..ops.layers import layer_norm, linear
from ..ops.threads import compiled
from .image_encoder import channel_projection


def _conv(conv: nn.Conv2d, x: mx.array) -> mx.array:
    """``conv(x)`` for a conv with bias and padding kernel // 2 (``modeling.tiny_vit.conv``)."""
    o, k, _, i = conv.weight.shape
    if conv.groups > 1:
        return _depthwise_conv(x, conv.weight, conv.bias, conv.stride[0])
    if k == 1 and conv.stride[0] == 1:
        return x @ conv.weight.reshape(o, i).T + conv.bias
    return mx.conv2d(x, conv.weight, stride=conv.stride, padding=k // 2) + conv.bias


@compiled
def _depthwise_conv(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """B x H x W x C (*) C x k x k x 1 depthwise conv, padding k // 2, as k*k fused shifted multiply-adds."""
    k, s = weight.shape[1], stride
    h, w = (x.shape[1] - 1) // s + 1, (x.shape[2] - 1) // s + 1
    p = k // 2
    x = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    out = bias
    for i in range(k):
        for j in range(k):
            out = out + x[:, i : i + s * (h - 1) + 1 : s, j : j + s * (w - 1) + 1 : s] * weight[:, i, j, 0]
    return out


def _mbconv(block: MBConv, x: mx.array) -> mx.array:
    """``block(x)``, its 1x1 convs in row bands."""
    hidden = _conv(block.conv2, across_rows(lambda t: gelu(_conv(block.conv1, t)), x))
    return across_rows(lambda t, h: gelu(t + _conv(block.conv3, gelu(h))), x, hidden)


def _patch_merging(merging: PatchMerging, x: mx.array) -> mx.array:
    return _conv(merging.conv3, gelu(_conv(merging.conv2, gelu(_conv(merging.conv1, x)))))


def _window_attention(attn: WindowAttention, x: mx.array) -> mx.array:
    """``attn(x)``: nWindows x window^2 x C -> same shape."""
    n, length, c = x.shape
    q, k, v = attn.split_qkv(across_rows(lambda t: linear(attn.qkv, layer_norm(attn.norm, t)), x))
    out = attention(q, k, v, q.shape[-1] ** -0.5, mask=attn.bias(), spread=True)
    return across_rows(lambda t: linear(attn.proj, t), out.transpose(0, 2, 1, 3).reshape(n, length, c))


def _tiny_vit_block(block: TinyViTBlock, x: mx.array) -> mx.array:
    """``block(x)``: B x H x W x C -> same shape, windows padded before the attention's LayerNorm."""
    b, h, w, _ = x.shape
    ws = block.window
    pad_h, pad_w = -h % ws, -w % ws
    padded = mx.pad(x, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)]) if pad_h or pad_w else x
    attended = _window_attention(block.attn, window_partition(padded, ws))
    x = x + window_unpartition(attended, ws, b, h + pad_h, w + pad_w)[:, :h, :w]
    x = _conv(block.local_conv, x)
    mlp = block.mlp
    return across_rows(lambda t: t + linear(mlp.fc2, gelu(linear(mlp.fc1, layer_norm(mlp.norm, t)))), x)


def encode_tiny_vit(encoder: TinyViTImageEncoder, image: mx.array) -> mx.array:
    """``encoder(image)``: B x H x W x 3 (H, W multiples of 16) -> B x H/16 x W/16 x out_chans."""
    return tiny_vit_features(encoder, image, keep_early=False)[0]


def tiny_vit_features(encoder: TinyViTImageEncoder, image: mx.array, keep_early: bool) -> tuple[mx.array,
                                                                                                 mx.array | None]:
    """``encoder.encode(image, keep_early)``: the image tokens and, with ``keep_early``, stage 1's output."""
    check_input(image)
    embedding = encoder.patch_embedding
    x = _conv(embedding.conv2, gelu(_conv(embedding.conv1, image)))
    early = None
    for i, stage in enumerate(encoder.stages):
        for block in stage.blocks:
            x = _mbconv(block, x) if isinstance(block, MBConv) else _tiny_vit_block(block, x)
        if "patch_merging" in stage:
            x = _patch_merging(stage.patch_merging, x)
        if keep_early and i == 1:
            early = x
    return channel_projection(encoder.channel_projection, x), early
