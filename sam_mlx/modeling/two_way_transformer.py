"""The mask decoder's two-way transformer.

Prompt tokens (queries) and image tokens (keys) update each other: every layer runs
self-attention over the prompt tokens, cross-attention prompt -> image, an MLP on
the prompt tokens, and cross-attention image -> prompt. Positional encodings are
re-added to queries/keys before every attention, and a final prompt -> image
attention closes the stack. The image tokens are kept in row bands (``token_bands``),
each computed on its own stream: on the CPU, one core per band.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..ops.attention import attention, banded_attention, softmax
from ..ops.layers import LayerNorm, Linear
from ..ops.bands import per_band


class ImageSide(NamedTuple):
    """The first layer's projections of the image tokens, one per image for all its prompts, in bands.

    Before the first layer the image side is the image tokens plus the "no mask" embedding,
    the same for every prompt without a mask hint, so its projections are computed once per
    image (three 4096 x 256 -> 128 products) instead of once per prompt; a mask hint shifts it
    by a low-rank term (``TwoWayAttentionBlock.shift_image``). Each field is a list of row bands
    (``token_bands``); the projections' bands are (1 or B) x heads x n x c.
    """

    image: list[mx.array]  # (1 or B) x n x D: the image tokens plus the dense embedding
    keys: list[mx.array]  # prompt -> image keys: k_proj(image + pe)
    values: list[mx.array]  # prompt -> image values: v_proj(image)
    queries: list[mx.array]  # image -> prompt queries: q_proj(image + pe)


class DownsampledAttention(nn.Module):
    """Multi-head attention whose q/k/v projections may shrink the width by ``downsample_rate``.

    Between a few prompt tokens and thousands of image tokens, projecting every image
    token (4096 x 256 -> 128, twice per attention) is most of the decoder's work. When
    heads x prompt tokens is below the projected width, the same result is computed
    with the projections moved to the prompt side, by associativity:

    - few queries (prompt -> image, ``to_bands``): logits_h = (q_h Wk_h) . k, the weighted
      sum is taken over the raw image tokens and projected by Wv_h afterwards (k's bias
      shifts every logit of a query equally, so softmax drops it; v's bias passes through
      because the weights sum to 1);
    - few keys (image -> prompt): logits_h = q . (Wq_h^T k_h) + bq_h . k_h, and the
      values are taken through out_proj before weighting, (v_h Wo_h^T).
    """

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
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(0, 2, 1, 3)

    def project(self, projection: nn.Linear, x: mx.array) -> mx.array:
        """B x N x D through one of the q/k/v projections -> B x heads x N x c."""
        return self.split_heads(projection(x))

    def _per_head(self, weight: mx.array) -> mx.array:
        """A projection weight (inner x D) as heads x head_dim x D."""
        return weight.reshape(self.num_heads, -1, weight.shape[-1])

    def __call__(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """q: B x Nq x D, k and v: (1 or B) x Nk x D -> B x Nq x D, for Nq >= Nk (``to_bands`` for few queries)."""
        nq, nk, inner = q.shape[1], k.shape[1], self.q_proj.weight.shape[0]
        if nq > nk and self.num_heads * nk < inner:
            return self._few_keys(q, k, v)
        q, k, v = self.project(self.q_proj, q), self.project(self.k_proj, k), self.project(self.v_proj, v)
        k, v = (mx.broadcast_to(t, (q.shape[0], *t.shape[1:])) for t in (k, v))
        return self._merge_heads(attention(q, k, v, q.shape[-1] ** -0.5))

    def to_bands(self, q: mx.array, keys: list[mx.array], values: list[mx.array]) -> mx.array:
        """Few queries (B x Nq x D) over many keys and values in row bands ((1 or B) x n x D each) -> B x Nq x D."""
        b, nq, d = q.shape
        if self.num_heads * nq >= self.q_proj.weight.shape[0]:  # too many queries for the key-space product
            keys = per_band(functools.partial(self.project, self.k_proj), keys)
            return self.to_projected_bands(q, keys, per_band(functools.partial(self.project, self.v_proj), values))
        q = self.project(self.q_proj, q)  # B x h x Nq x c
        q_in_key_space = (q @ self._per_head(self.k_proj.weight)).reshape(b, 1, -1, d)  # B x 1 x h*Nq x D
        pooled = banded_attention(q_in_key_space, [k[:, None] for k in keys], [v[:, None] for v in values],
                                  q.shape[-1] ** -0.5)  # raw image tokens, weighted
        value_weight = self._per_head(self.v_proj.weight)  # h x c x D
        values = pooled.reshape(b, self.num_heads, nq, d) @ value_weight.swapaxes(1, 2)
        return self._merge_heads(values + self.v_proj.bias.reshape(self.num_heads, 1, -1))

    def to_projected_bands(self, q: mx.array, keys: list[mx.array], values: list[mx.array]) -> mx.array:
        """q: B x Nq x D; keys, values: bands already projected, (1 or B) x heads x n x c each -> B x Nq x D."""
        q = self.project(self.q_proj, q)
        return self._merge_heads(banded_attention(q, keys, values, q.shape[-1] ** -0.5))

    def attend_projected_queries(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        """q: already projected, (1 or B) x heads x Nq x c, many; k, v: B x Nk x D, few -> B x Nq x D."""
        k = self.project(self.k_proj, k)
        return self._weighted_values((k @ q.swapaxes(-1, -2)) * k.shape[-1] ** -0.5, v)

    def _merge_heads(self, x: mx.array) -> mx.array:
        """B x heads x N x head_dim -> B x N x D through out_proj."""
        b, h, n, c = x.shape
        return self.out_proj(x.transpose(0, 2, 1, 3).reshape(b, n, h * c))

    def _few_keys(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        b, nk = k.shape[:2]  # q may be one image's tokens for all B prompts
        nq, d = q.shape[1:]
        h = self.num_heads
        k = self.project(self.k_proj, k)  # B x h x Nk x c
        k_in_query_space = (k @ self._per_head(self.q_proj.weight)).reshape(b, h * nk, d)
        query_bias = (k @ self.q_proj.bias.reshape(h, -1, 1)).reshape(b, h * nk, 1)
        logits = (k_in_query_space @ q.swapaxes(1, 2) + query_bias) * k.shape[-1] ** -0.5
        return self._weighted_values(logits.reshape(b, h, nk, nq), v)

    def _weighted_values(self, logits: mx.array, v: mx.array) -> mx.array:
        """Logits B x heads x Nk x Nq of many queries over a few keys, values v: B x Nk x D -> B x Nq x D.

        The logits are transposed (keys first): the softmax over each head's Nk rows then runs
        along the long contiguous axis, much faster on the CPU than over rows of Nk values.
        The values go through out_proj before weighting, (v_h Wo_h^T), as Nk is small.
        """
        b, h, nk, nq = logits.shape
        d = v.shape[-1]
        weights = softmax(logits, axis=2).reshape(b, h * nk, nq)
        out_weight = self.out_proj.weight.reshape(d, h, -1).transpose(1, 2, 0)  # h x c x D
        values = (self.project(self.v_proj, v) @ out_weight).reshape(b, h * nk, d)
        return weights.swapaxes(1, 2) @ values + self.out_proj.bias


class FeedForward(nn.Module):
    """Linear, ReLU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = Linear(dim, hidden)
        self.lin2 = Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.lin2(nn.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = DownsampledAttention(dim, num_heads)
        self.norm1 = LayerNorm(dim)
        self.cross_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate=2)
        self.norm2 = LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.norm3 = LayerNorm(dim)
        self.norm4 = LayerNorm(dim)
        self.cross_attn_image_to_token = DownsampledAttention(dim, num_heads, downsample_rate=2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def __call__(
        self,
        queries: mx.array,
        keys: list[mx.array],
        query_pe: mx.array,
        key_pe: list[mx.array],
        image_side: ImageSide | None = None,
    ) -> tuple[mx.array, list[mx.array]]:
        """queries: B x Nq x D prompt tokens; keys: the image tokens in row bands, (1 or B) x n x D each,
        with position encodings ``key_pe`` (1 x n x D bands). Both are updated, the image band by band.

        ``image_side``: the projections of these ``keys`` (``project_image``), if already computed.
        """
        if self.skip_first_layer_pe:  # the first layer's queries are the raw prompt embeddings
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        to_image, to_tokens = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        if image_side is None:
            k = per_band(mx.add, keys, key_pe)
            attn = to_image.to_bands(queries + query_pe, k, keys)
        else:
            attn = to_image.to_projected_bands(queries + query_pe, image_side.keys, image_side.values)
        queries = self.norm2(queries + attn)
        queries = self.norm3(queries + self.mlp(queries))
        prompt_keys = queries + query_pe
        if image_side is None:
            attn_bands = per_band(lambda band: to_tokens(band, prompt_keys, queries), k)
        else:
            attn_bands = per_band(lambda band: to_tokens.attend_projected_queries(band, prompt_keys, queries),
                                  image_side.queries)
        return queries, per_band(lambda band, attn: self.norm4(band + attn), keys, attn_bands)

    def project_image(self, keys: list[mx.array], key_pe: list[mx.array]) -> ImageSide:
        """Image token bands (1 x n x D each) with their projections in this block's two cross-attentions."""
        to_image, to_tokens = self.cross_attn_token_to_image, self.cross_attn_image_to_token

        def project(band: mx.array, pe: mx.array) -> tuple[mx.array, ...]:
            k = band + pe
            projections = (to_image.project(to_image.k_proj, k), to_image.project(to_image.v_proj, band),
                           to_tokens.project(to_tokens.q_proj, k))
            # kept row-major: as head-split views, every prompt's attention would copy them again
            return tuple(mx.contiguous(p) for p in projections)

        return ImageSide(keys, *(list(field) for field in zip(*per_band(project, keys, key_pe))))

    def shift_image(self, side: ImageSide, change: list[mx.array], weight: mx.array, offset: mx.array) -> ImageSide:
        """``project_image`` of side.image + change @ weight + offset, from ``side``'s, for B prompts.

        change: bands of B x n x k with k well under D (the mask hint's features, ``MaskHint``); weight: k x D,
        offset: D. The projections are linear, so each gains the shift's own projection W (no bias), computed
        k wide by associativity, change @ (weight W^T) + offset W^T: 3 x n x k x 128 multiply-adds per band
        instead of n x D x 128 for each of the 3 (or the prompt-side products ``to_bands`` would take).
        """
        attentions = (self.cross_attn_token_to_image, self.cross_attn_token_to_image, self.cross_attn_image_to_token)
        projections = (attentions[0].k_proj, attentions[1].v_proj, attentions[2].q_proj)
        stacked = mx.concatenate([p.weight for p in projections]).T  # D x (3 x inner)
        bounds = list(itertools.accumulate(p.weight.shape[0] for p in projections))[:-1]

        def shift(image: mx.array, band: mx.array, *projected: mx.array) -> tuple[mx.array, ...]:
            shifts = mx.split(band @ (weight @ stacked) + offset @ stacked, bounds, axis=-1)
            return (image + (band @ weight + offset),
                    *(p + a.split_heads(s) for p, a, s in zip(projected, attentions, shifts, strict=True)))

        fields = per_band(shift, side.image, change, side.keys, side.values, side.queries)
        return ImageSide(*(list(field) for field in zip(*fields)))


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.layers = [TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=i == 0) for i in range(depth)]
        self.final_attn_token_to_image = DownsampledAttention(dim, num_heads, downsample_rate=2)
        self.norm_final_attn = LayerNorm(dim)

    def __call__(
        self,
        image: list[mx.array],
        image_pe: list[mx.array],
        tokens: mx.array,
        image_side: ImageSide | None = None,
        outputs: Sequence[int] | None = None,
    ) -> tuple[mx.array, list[mx.array]]:
        """image: the image tokens in row bands, (1 or B) x n x D each, image_pe: their 1 x n x D bands;
        tokens: B x N x D -> (tokens B x M x D, image bands B x n x D).

        ``image_side``: ``self.layers[0].project_image(image, image_pe)`` if the caller keeps it.
        ``outputs``: the M of the N tokens the caller reads (all if None). The final attention and its
        norm are per query token, so only those are computed: its cost grows with the queries.
        """
        queries, keys = tokens, image
        for i, layer in enumerate(self.layers):
            queries, keys = layer(queries, keys, tokens, image_pe, image_side if i == 0 else None)
        if outputs is not None:
            rows = mx.array(outputs)
            queries, tokens = queries[:, rows], tokens[:, rows]
        attn = self.final_attn_token_to_image.to_bands(queries + tokens, per_band(mx.add, keys, image_pe), keys)
        return self.norm_final_attn(queries + attn), keys
