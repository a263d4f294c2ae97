"""MobileSAM's image encoder: TinyViT-5M, turning an image into 256-channel image tokens at stride 16.

The parts, channels-last throughout (strides for the standard 1024 x 1024 input):
  image B x H x W x 3
  --patch embedding (two 3x3 stride-2 convs, GELU between)-->       B x H/4 x W/4 x 64
  --stage 0: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project)--> same grid
    patch merging (1x1, 3x3 depthwise stride 2, 1x1)-->              B x H/8 x W/8 x 128
  --stage 1: TinyViT blocks, 7 x 7 windows, then patch merging (stride 2)--> B x H/16 x W/16 x 160
  --stage 2: TinyViT blocks, 14 x 14 windows, then patch merging (stride 1: MobileSAM keeps the
    64 x 64 grid here, where the classification TinyViT would downsample again)--> 320 channels
  --stage 3: TinyViT blocks, 7 x 7 windows
  --channel projection (1x1 conv, LN, 3x3 conv, LN)-->              B x H/16 x W/16 x 256

A TinyViT block is: windowed attention (pre-LayerNorm, a learned bias per offset) + residual,
3x3 depthwise conv, MLP (pre-LayerNorm) + residual. Every conv of the trunk had a BatchNorm
after it, which the checkpoint converter folds into the conv's weight and bias.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import TinyViTConfig
from .common import ChannelProjection

_LN_EPS = 1e-5  # torch.nn.LayerNorm's default, used by the attention and MLP norms


def conv(in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, depthwise: bool = False) -> nn.Conv2d:
    """A conv with its BatchNorm folded in (so with a bias), padded by kernel // 2."""
    groups = in_chans if depthwise else 1
    return nn.Conv2d(in_chans, out_chans, kernel, stride=stride, padding=kernel // 2, groups=groups)


class PatchEmbedding(nn.Module):
    """Two 3x3 stride-2 convs with a GELU between: B x H x W x 3 -> B x H/4 x W/4 x dim."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = conv(3, dim // 2, 3, stride=2)
        self.conv2 = conv(dim // 2, dim, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv2(nn.gelu(self.conv1(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, GELU, 3x3 depthwise, GELU, 1x1 project, + input, GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv1 = conv(dim, hidden)
        self.conv2 = conv(hidden, hidden, 3, depthwise=True)
        self.conv3 = conv(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        hidden = nn.gelu(self.conv2(nn.gelu(self.conv1(x))))
        return nn.gelu(x + self.conv3(hidden))


class PatchMerging(nn.Module):
    """1x1 conv, GELU, 3x3 depthwise conv with ``stride``, GELU, 1x1 conv.

    B x H x W x I -> B x H/s x W/s x O (stride 2, or 1 for MobileSAM's last merging).
    """

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = conv(dim, out_dim)
        self.conv2 = conv(out_dim, out_dim, 3, stride=stride, depthwise=True)
        self.conv3 = conv(out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv3(nn.gelu(self.conv2(nn.gelu(self.conv1(x)))))


@lru_cache(maxsize=16)
def attention_bias_index(window: int) -> np.ndarray:
    """N x N (N = window^2) index into a per-head bias table of ``window^2`` offsets.

    Tokens i, j at (yi, xi), (yj, xj) of the window share the learned bias of the offset
    (|yi - yj|, |xi - xj|), stored at ``|dy| * window + |dx|`` (TinyViT's first-seen order).
    """
    y, x = np.divmod(np.arange(window * window), window)
    return np.abs(y[:, None] - y[None, :]) * window + np.abs(x[:, None] - x[None, :])


class WindowAttention(nn.Module):
    """LayerNorm + multi-head self-attention inside each window, with a learned bias per offset.

    ``qkv`` is laid out per head as [q, k, v] (TinyViT's order), not as [q heads, k heads, v heads].
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = mx.zeros((num_heads, window * window))

    def split_qkv(self, qkv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """nWindows x window^2 x 3C -> q, k, v, each nWindows x heads x window^2 x head_dim."""
        n, length, c3 = qkv.shape
        qkv = qkv.reshape(n, length, self.num_heads, c3 // self.num_heads).transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, 3, axis=-1)
        return q, k, v

    def bias(self) -> mx.array:
        """heads x N x N: each pair of a window's tokens gets its offset's learned bias."""
        return self.attention_biases[:, mx.array(attention_bias_index(self.window))]

    def __call__(self, x: mx.array) -> mx.array:
        """x: nWindows x window^2 x C -> same shape."""
        n, length, c = x.shape
        q, k, v = self.split_qkv(self.qkv(self.norm(x)))
        logits = (q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2) + self.bias()
        out = mx.softmax(logits, axis=-1, precise=True) @ v
        return self.proj(out.transpose(0, 2, 1, 3).reshape(n, length, c))


class TinyViTMLP(nn.Module):
    """LayerNorm, Linear, GELU, Linear (the norm is part of TinyViT's MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=_LN_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(self.norm(x))))


def window_partition(x: mx.array, window: int) -> mx.array:
    """B x H x W x C, H and W multiples of ``window`` -> (B * nWindows) x window^2 x C."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_unpartition(windows: mx.array, window: int, b: int, h: int, w: int) -> mx.array:
    """Inverse of ``window_partition``: back to B x H x W x C."""
    c = windows.shape[-1]
    x = windows.reshape(b, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


class TinyViTBlock(nn.Module):
    """Windowed attention + residual, depthwise conv, MLP + residual."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = conv(dim, dim, local_conv_size, depthwise=True)
        self.mlp = TinyViTMLP(dim, int(dim * mlp_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x C -> same shape, for any H, W.

        The grid is zero-padded bottom/right to whole windows *before* the attention's LayerNorm,
        as in TinyViT: padded tokens are not masked and take part as keys (with the LayerNorm's
        bias as their features), so windows keep their trained size.
        """
        b, h, w, _ = x.shape
        ws = self.window
        pad_h, pad_w = -h % ws, -w % ws
        padded = mx.pad(x, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)]) if pad_h or pad_w else x
        attended = self.attn(window_partition(padded, ws))
        x = x + window_unpartition(attended, ws, b, h + pad_h, w + pad_w)[:, :h, :w]
        x = self.local_conv(x)
        return x + self.mlp(x)


class Stage(nn.Module):
    """A stage's blocks (MBConv in stage 0, TinyViT blocks after) and its patch merging (all stages but the last)."""

    def __init__(self, config: TinyViTConfig, index: int):
        super().__init__()
        dim = config.embed_dims[index]
        if index == 0:
            hidden = int(dim * config.mbconv_expand_ratio)
            self.blocks = [MBConv(dim, hidden) for _ in range(config.depths[0])]
        else:
            heads, window = config.num_heads[index], config.window_sizes[index]
            self.blocks = [
                TinyViTBlock(dim, heads, window, config.mlp_ratio, config.local_conv_size)
                for _ in range(config.depths[index])
            ]
        last = len(config.depths) - 1
        if index < last:  # MobileSAM's last merging keeps the resolution (stride 1)
            stride = 1 if index == last - 1 else 2
            self.patch_merging = PatchMerging(dim, config.embed_dims[index + 1], stride)

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.blocks:
            x = block(x)
        return self.patch_merging(x) if "patch_merging" in self else x


def check_input(x: mx.array) -> None:
    """TinyViT's strides need B x H x W x 3 with H and W multiples of 16."""
    if x.ndim != 4 or x.shape[1] % 16 or x.shape[2] % 16 or x.shape[3] != 3:
        raise ValueError(f"expected B x H x W x 3 with H, W multiples of 16, got {x.shape}")


class TinyViTImageEncoder(nn.Module):
    """MobileSAM's TinyViT image encoder: B x H x W x 3 normalized image (H, W multiples of 16) ->
    B x H/16 x W/16 x out_chans image tokens."""

    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding(config.embed_dims[0])
        self.stages = [Stage(config, i) for i in range(len(config.depths))]
        self.channel_projection = ChannelProjection(config.embed_dims[-1], config.out_chans)

    def __call__(self, image: mx.array) -> mx.array:
        return self.encode(image)[0]

    def encode(self, image: mx.array, keep_early: bool = False) -> tuple[mx.array, mx.array | None]:
        """-> (image tokens, and with ``keep_early`` the early features Light HQ-SAM fuses: stage 1's output
        after its patch merging, B x H/16 x W/16 x embed_dims[2]; else None)."""
        check_input(image)
        x = self.patch_embedding(image)
        early = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if keep_early and i == 1:
                early = x
        return self.channel_projection(x), early
