"""SAM's ViT image encoder: a ViTDet backbone that turns an image into 256-channel image tokens.

The four parts, channels-last throughout:
  image B x H x W x 3
  --patch embedding (16 x 16 conv, stride 16)-->  B x h x w x D patch tokens
  --position encoding (learned at 64 x 64; resized to the grid's longest side, cropped to h x w), added-->
  --stages of transformer blocks-->  each stage is windowed-attention blocks (14 x 14 windows) closed by one
                                     global-attention block (4 stages in SAM); every block's attention adds
                                     SAM's decomposed relative position term
  --channel projection (1x1 conv, LN, 3x3 conv, LN)-->  B x h x w x 256 image tokens
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ViTConfig
from .common import ChannelProjection, linear_resize_matrix


class PositionEncoding(nn.Module):
    """A learned position encoding, added to the patch tokens."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.embedding = mx.zeros((1, grid, grid, dim))

    def for_grid(self, h: int, w: int) -> mx.array:
        """The 1 x h x w x D encoding of an h x w token grid.

        The trained square encoding is bilinearly resized to the grid's longest side and the grid
        takes its top-left h x w part: both axes keep one scale, and a grid with the original's scale
        (stretch sizing at 1024) gets exactly the encodings its tokens have in the original's padded square.
        """
        pe = self.embedding
        if pe.shape[1:3] == (h, w):
            return pe
        frame = max(h, w)
        ry = mx.array(linear_resize_matrix(pe.shape[1], frame)[:h])
        rx = mx.array(linear_resize_matrix(pe.shape[2], frame)[:w])
        return mx.einsum("yh,hwc,xw->yxc", ry, pe[0].astype(mx.float32), rx)[None].astype(pe.dtype)

    def __call__(self, tokens: mx.array) -> mx.array:
        """B x h x w x D -> the same tokens with their position encoding added."""
        return tokens + self.for_grid(tokens.shape[1], tokens.shape[2])


def relative_position_table(table: mx.array, size: int, frame: int) -> mx.array:
    """Expand a learned relative-position table to ``size x size x head_dim``.

    ``table`` holds one embedding per offset (2 * trained_size - 1 rows). It is linearly resized
    to the offsets of a ``frame``-long axis (the grid's longest side, so both axes keep one scale),
    then indexed by (query index - key index): entry [i, j] is the embedding of offset i - j. An axis
    shorter than the frame uses the middle offsets, as in the original, where such an image fills part
    of a padded square.
    """
    rows = 2 * frame - 1
    if table.shape[0] != rows:
        table = mx.array(linear_resize_matrix(table.shape[0], rows)) @ table.astype(mx.float32)
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :] + (frame - 1)
    return table[mx.array(offsets)]


class Attention(nn.Module):
    """Multi-head self-attention over a 2-D token grid with decomposed relative position encoding.

    The logit between query (y, x) and key (y', x') gets ``q . Rh[y - y'] + q . Rw[x - x']``:
    two small per-axis terms instead of a full 2-D table.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, rel_pos_size: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = mx.zeros((2 * rel_pos_size - 1, self.head_dim))
            self.rel_pos_w = mx.zeros((2 * rel_pos_size - 1, self.head_dim))

    def split_qkv(self, qkv: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """B x H x W x 3C (``self.qkv`` of the tokens) -> q, k, v, each B x heads x HW x head_dim."""
        b, h, w, _ = qkv.shape
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        return q, k, v

    def relative_position_terms(self, q: mx.array, h: int, w: int) -> tuple[mx.array, mx.array]:
        """The per-axis relative-position logits of queries q (B x heads x HW x d) on an h x w grid:
        B x heads x HW x h (over key rows) and B x heads x HW x w (over key columns)."""
        b, n = q.shape[:2]
        frame = max(h, w)
        rh = relative_position_table(self.rel_pos_h, h, frame).astype(q.dtype)  # h x h x d
        rw = relative_position_table(self.rel_pos_w, w, frame).astype(q.dtype)  # w x w x d
        grid_q = q.reshape(b, n, h, w, self.head_dim)
        bias_h = mx.einsum("bnhwc,hkc->bnhwk", grid_q, rh)
        bias_w = mx.einsum("bnhwc,wkc->bnhwk", grid_q, rw)
        return bias_h.reshape(b, n, h * w, h), bias_w.reshape(b, n, h * w, w)

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x C -> B x H x W x C."""
        b, h, w, c = x.shape
        q, k, v = self.split_qkv(self.qkv(x))
        logits = (q * self.scale) @ k.swapaxes(-1, -2)  # B x heads x HW x HW
        if self.use_rel_pos:
            bias_h, bias_w = self.relative_position_terms(q, h, w)
            logits = logits + (bias_h[..., :, None] + bias_w[..., None, :]).reshape(logits.shape)
        out = mx.softmax(logits, axis=-1, precise=True) @ v
        return self.proj(out.transpose(0, 2, 1, 3).reshape(b, h, w, c))


class MLPBlock(nn.Module):
    """Per-token feed-forward: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(nn.gelu(self.lin1(x)))


def window_partition(x: mx.array, window: int) -> tuple[mx.array, tuple[int, int]]:
    """B x H x W x C -> (B * nWin) x window x window x C, zero-padding H and W up to multiples."""
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = mx.pad(x, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)])
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: mx.array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> mx.array:
    """Inverse of ``window_partition``: back to B x H x W x C with the padding cut off."""
    hp, wp = padded
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, : size[0], : size[1], :]


class Block(nn.Module):
    """Pre-norm transformer block; its attention is windowed when ``window_size`` > 0, else global."""

    def __init__(self, config: ViTConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        rel_pos_size = window_size if window_size > 0 else config.pretrain_grid
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = Attention(config.embed_dim, config.num_heads, config.qkv_bias, config.use_rel_pos, rel_pos_size)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = MLPBlock(config.embed_dim, config.mlp_dim)

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x C -> B x H x W x C."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:  # windows padded after the norm, as in the original
            size = (x.shape[1], x.shape[2])
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(windows), self.window_size, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """Windowed-attention blocks closed by a global-attention block, which mixes information across the image."""

    def __init__(self, config: ViTConfig, blocks: tuple[int, ...]):
        super().__init__()
        self.blocks = [
            Block(config, 0 if i in config.global_attention_blocks else config.window_size) for i in blocks
        ]

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.blocks:
            x = block(x)
        return x


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: B x H x W x 3 normalized image -> B x H/16 x W/16 x 256 image tokens."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d, p = config.embed_dim, config.patch_size
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.position_encoding = PositionEncoding(d, config.pretrain_grid)
        self.stages = [Stage(config, blocks) for blocks in config.stages]
        self.channel_projection = ChannelProjection(d, config.out_chans)

    def __call__(self, image: mx.array) -> mx.array:
        return self.encode(image)[0]

    def encode(self, image: mx.array, keep_early: bool = False) -> tuple[mx.array, mx.array | None]:
        """-> (image tokens, and with ``keep_early`` the early features HQ-SAM fuses: the first stage's output,
        after the first global-attention block, B x h x w x embed_dim; else None)."""
        x = self.position_encoding(self.patch_embedding(image))
        early = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if keep_early and i == 0:
                early = x
        return self.channel_projection(x), early
