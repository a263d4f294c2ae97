"""The mask decoder's two-way transformer.

Prompt tokens (queries) and image tokens (keys) update each other: every layer runs
self-attention over the prompt tokens, cross-attention prompt -> image, an MLP on
the prompt tokens, and cross-attention image -> prompt. Positional encodings are
re-added to queries/keys before every attention, and a final prompt -> image
attention closes the stack.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .attention import attention


class DownsampledAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1):
        super().__init__()
        inner = dim // downsample_rate
        if inner % num_heads:
            raise ValueError(f"attention width {inner} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: mx.array) -> mx.array:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """q: B x Nq x D, k and v: B x Nk x D -> B x Nq x D."""
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        out = attention(q, k, v, q.shape[-1] ** -0.5)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(b, n, h * c))


class FeedForward(nn.Module):
    """Linear, ReLU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = DownsampledAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = DownsampledAttention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self, queries: mx.array, keys: mx.array, query_pe: mx.array, key_pe: mx.array
    ) -> tuple[mx.array, mx.array]:
        """queries: B x Nq x D prompt tokens, keys: B x HW x D image tokens; both updated."""
        if self.skip_first_layer_pe:  # the first layer's queries are the raw prompt embeddings
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.layers = [TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=i == 0) for i in range(depth)]
        self.final_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def __call__(self, image: mx.array, image_pe: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """image, image_pe: B x HW x D; tokens: B x N x D -> (tokens B x N x D, image B x HW x D)."""
        queries, keys = tokens, image
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, image_pe)
        attn = self.final_attn_token_to_image(queries + tokens, keys + image_pe, keys)
        return self.norm_final_attn(queries + attn), keys
