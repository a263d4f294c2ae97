"""The mask decoder's two-way transformer: prompt tokens and image tokens update each other.

Every layer runs self-attention over the prompt tokens (queries), cross-attention prompt -> image,
an MLP on the prompt tokens, and cross-attention image -> prompt. Position encodings are re-added
to queries and keys before every attention, and a final prompt -> image attention closes the stack.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class Attention(nn.Module):
    """Multi-head attention whose q/k/v projections may narrow the width by ``downsample_rate``."""

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

    def split_heads(self, x: mx.array) -> mx.array:
        """B x N x inner -> B x heads x N x head_dim."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

    def merge_heads(self, x: mx.array) -> mx.array:
        """B x heads x N x head_dim -> B x N x inner."""
        b, h, n, c = x.shape
        return x.transpose(0, 2, 1, 3).reshape(b, n, h * c)

    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """q: B x Nq x D, k and v: B x Nk x D -> B x Nq x D."""
        q, k, v = self.split_heads(self.q_proj(q)), self.split_heads(self.k_proj(k)), self.split_heads(self.v_proj(v))
        logits = (q * q.shape[-1] ** -0.5) @ k.swapaxes(-1, -2)
        return self.out_proj(self.merge_heads(mx.softmax(logits, axis=-1, precise=True) @ v))


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
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self, queries: mx.array, keys: mx.array, query_pe: mx.array, key_pe: mx.array
    ) -> tuple[mx.array, mx.array]:
        """queries: B x Nq x D prompt tokens with position encodings ``query_pe``; keys: B x Nk x D image tokens
        with ``key_pe`` (1 x Nk x D). Both are updated."""
        if self.skip_first_layer_pe:  # the first layer's queries are the raw prompt embeddings
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))

        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.layers = [TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=i == 0) for i in range(depth)]
        self.final_attn_token_to_image = Attention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def __call__(self, image: mx.array, image_pe: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """image: B x h x w x D image tokens, image_pe: their h x w x D position encoding, tokens: B x N x D
        prompt tokens -> (prompt tokens B x N x D, image tokens B x hw x D)."""
        b, h, w, d = image.shape
        keys, key_pe = image.reshape(b, h * w, d), image_pe.reshape(1, h * w, d)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
