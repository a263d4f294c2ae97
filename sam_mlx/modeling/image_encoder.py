"""The SAM ViT image encoder: a ViTDet backbone that turns an image into 256-channel tokens.

Pipeline (channels-last throughout):
  image B x H x W x 3  --patch embedding (16x16 conv, stride 16)-->  B x h x w x D
  + learned position encoding (trained at 64 x 64; resized to the grid's longest side, cropped to h x w)
  --transformer blocks-->  windowed attention (14 x 14 windows) in most blocks and
                            global attention in one block closing each of the 4 stages;
                            every block adds SAM's decomposed relative position term
  --channel projection (1x1 conv, LN, 3x3 conv, LN)-->  B x h x w x 256
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..ops.attention import attention
from ..config import ViTConfig
from ..ops.layers import LayerNorm, gelu, layer_norm_2d
from ..fast.masks import linear_resize_matrix
from ..ops.bands import across_rows


def relative_position_table(table: mx.array, size: int, frame: int) -> mx.array:
    """Expand a learned relative-position table to ``size x size x head_dim``.

    ``table`` holds one embedding per offset (2 * trained_size - 1 rows). It is
    linearly resized to the offsets of a ``frame``-long axis (the grid's longest side,
    so both axes keep one scale), then indexed by (query index - key index): entry
    [i, j] is the embedding of offset i - j. An axis shorter than the frame uses the
    middle offsets, as in the original, where such an image fills part of a padded square.
    """
    rows = 2 * frame - 1
    if table.shape[0] != rows:
        table = mx.array(linear_resize_matrix(table.shape[0], rows)) @ table.astype(mx.float32)
    offsets = np.arange(size)[:, None] - np.arange(size)[None, :] + (frame - 1)
    return table[mx.array(offsets)]


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a 2-D token grid with decomposed relative position encoding.

    The attention logit between query (y, x) and key (y', x') gets
    ``q . Rh[y - y'] + q . Rw[x - x']``: two small per-axis terms instead of a
    full 2-D table, added to the logits per chunk by ``attention``.
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

    def __call__(self, qkv: mx.array) -> mx.array:
        """The attention between the projections: qkv B x H x W x 3C (``self.qkv`` of the tokens) -> B x H x W x C.

        The block applies ``qkv`` before and ``proj`` after, as per-token work in row bands; here the
        chunks of the attention are spread over the same streams (``token_bands``).
        """
        b, h, w, c = qkv.shape[0], qkv.shape[1], qkv.shape[2], qkv.shape[3] // 3
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, self.head_dim).transpose(2, 0, 3, 1, 4)  # B x heads x HW x d
        rel_pos = self._relative_position_terms(q, h, w) if self.use_rel_pos else None
        out = attention(q, k, v, self.scale, rel_pos=rel_pos, spread=True)
        return out.transpose(0, 2, 1, 3).reshape(b, h, w, c)

    def _relative_position_terms(self, q: mx.array, h: int, w: int) -> tuple[mx.array, mx.array]:
        """The per-axis relative-position logits: B x heads x HW x H (key rows), B x heads x HW x W (columns)."""
        b, n = q.shape[:2]
        frame = max(h, w)
        rh = relative_position_table(self.rel_pos_h, h, frame).astype(q.dtype)  # H x H x d
        rw = relative_position_table(self.rel_pos_w, w, frame).astype(q.dtype)  # W x W x d
        grid_q = q.reshape(b, n, h, w, self.head_dim)
        bias_h = mx.einsum("bnhwc,hkc->bnhwk", grid_q, rh)
        bias_w = mx.einsum("bnhwc,wkc->bnhwk", grid_q, rw)
        return bias_h.reshape(b, n, h * w, h), bias_w.reshape(b, n, h * w, w)


class EncoderMLP(nn.Module):
    """Per-token feed-forward: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(gelu(self.lin1(x)))


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


class EncoderBlock(nn.Module):
    """Pre-norm transformer block; attention is windowed when ``window_size`` > 0, else global."""

    def __init__(self, config: ViTConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        rel_pos_size = window_size if window_size > 0 else config.pretrain_grid
        self.norm1 = LayerNorm(config.embed_dim, eps=1e-6)
        self.attn = RelPosAttention(
            config.embed_dim, config.num_heads, config.qkv_bias, config.use_rel_pos, rel_pos_size
        )
        self.norm2 = LayerNorm(config.embed_dim, eps=1e-6)
        self.mlp = EncoderMLP(config.embed_dim, config.mlp_dim)

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x C -> B x H x W x C.

        The per-token work runs in row bands and the attention's chunks are spread over the same
        streams (``token_bands``): on the CPU, every core works on every stage.
        """
        if self.window_size > 0:
            size = (x.shape[1], x.shape[2])
            windows, padded = window_partition(across_rows(self.norm1, x), self.window_size)  # padded after the norm
            attended = self.attn(across_rows(self.attn.qkv, windows))
            attended = window_unpartition(attended, self.window_size, padded, size)
        else:
            attended = self.attn(across_rows(lambda t: self.attn.qkv(self.norm1(t)), x))
        return across_rows(self._residual_and_mlp, x, attended)

    def _residual_and_mlp(self, shortcut: mx.array, attended: mx.array) -> mx.array:
        x = shortcut + self.attn.proj(attended)
        return x + self.mlp(self.norm2(x))


class ChannelProjection(nn.Module):
    """The encoder's neck: 1x1 conv, LayerNorm, 3x3 conv, LayerNorm, down to ``out_chans``."""

    def __init__(self, dim: int, out_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, out_chans, kernel_size=1, bias=False)
        self.norm1 = layer_norm_2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False)
        self.norm2 = layer_norm_2d(out_chans)

    def __call__(self, x: mx.array) -> mx.array:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))))


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder: B x H x W x 3 normalized image -> B x H/16 x W/16 x 256 tokens."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        d, p = config.embed_dim, config.patch_size
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.pos_embed = mx.zeros((1, config.pretrain_grid, config.pretrain_grid, d))
        self.blocks = [
            EncoderBlock(config, 0 if i in config.global_attention_blocks else config.window_size)
            for i in range(config.depth)
        ]
        self.neck = ChannelProjection(d, config.out_chans)

    def position_encoding(self, h: int, w: int) -> mx.array:
        """The learned 1 x h x w x D position encoding for an h x w token grid.

        The trained square encoding is bilinearly resized to the grid's longest side and
        the grid takes its top-left h x w part: both axes keep one scale, and a grid with
        the original's scale (stretch sizing at 1024) gets exactly the encodings its tokens
        have in the original's padded square.
        """
        pe = self.pos_embed
        if pe.shape[1:3] == (h, w):
            return pe
        frame = max(h, w)
        ry = mx.array(linear_resize_matrix(pe.shape[1], frame)[:h])
        rx = mx.array(linear_resize_matrix(pe.shape[2], frame)[:w])
        return mx.einsum("yh,hwc,xw->yxc", ry, pe[0].astype(mx.float32), rx)[None].astype(pe.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.patch_embed(x)
        x = x + self.position_encoding(x.shape[1], x.shape[2])
        for block in self.blocks:
            x = block(x)
        return self.neck(x)
