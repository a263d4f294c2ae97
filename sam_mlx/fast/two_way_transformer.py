"""The two-way transformer over ``modeling.two_way_transformer``'s parameters, for one image and many prompts.

What differs from the plain forward, with the same result:
- the image tokens travel as row bands (``ops.bands``), each computed on its own stream (one core each);
- attention between the few prompt tokens and the many image tokens has its projections moved to the
  prompt side, by associativity (``attend_to_bands``, ``_attend_few_keys``);
- the first layer's image-side projections are the same for every prompt of an image without a mask
  hint: computed once per image (``project_image``), shifted by a low-rank term for a hint (``shift_image``);
- the final prompt -> image attention is computed only for the tokens the caller reads.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn

from ..modeling.two_way_transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer
from ..ops.attention import attention, banded_attention, softmax
from ..ops.bands import per_band
from ..ops.layers import layer_norm, linear


class ImageSide(NamedTuple):
    """The first layer's projections of the image tokens, one per image for all its prompts, in bands.

    Before the first layer the image side is the image tokens plus the "no mask" embedding, the same
    for every prompt without a mask hint, so its projections are computed once per image (three
    4096 x 256 -> 128 products) instead of once per prompt; a mask hint shifts it by a low-rank term
    (``shift_image``). Each field is a list of row bands; the projections' bands are (1 or B) x heads x n x c.
    """

    image: list[mx.array]  # (1 or B) x n x D: the image tokens plus the dense embedding
    keys: list[mx.array]  # prompt -> image keys: k_proj(image + pe)
    values: list[mx.array]  # prompt -> image values: v_proj(image)
    queries: list[mx.array]  # image -> prompt queries: q_proj(image + pe)


# ------------------------------------------------------------------ attention
def _project(attn: Attention, projection: nn.Linear, x: mx.array) -> mx.array:
    """B x N x D through one of attn's q/k/v projections -> B x heads x N x c."""
    return attn.split_heads(projection(x))


def _per_head(attn: Attention, weight: mx.array) -> mx.array:
    """A projection weight (inner x D) as heads x head_dim x D."""
    return weight.reshape(attn.num_heads, -1, weight.shape[-1])


def _merge_heads(attn: Attention, x: mx.array) -> mx.array:
    """B x heads x N x head_dim -> B x N x D through out_proj."""
    return attn.out_proj(attn.merge_heads(x))


def attend(attn: Attention, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """``attn(q, k, v)``: q: B x Nq x D, k and v: (1 or B) x Nk x D -> B x Nq x D, for Nq >= Nk
    (``attend_to_bands`` for few queries)."""
    nq, nk, inner = q.shape[1], k.shape[1], attn.q_proj.weight.shape[0]
    if nq > nk and attn.num_heads * nk < inner:
        return _attend_few_keys(attn, q, k, v)
    q, k, v = _project(attn, attn.q_proj, q), _project(attn, attn.k_proj, k), _project(attn, attn.v_proj, v)
    k, v = (mx.broadcast_to(t, (q.shape[0], *t.shape[1:])) for t in (k, v))
    return _merge_heads(attn, attention(q, k, v, q.shape[-1] ** -0.5))


def attend_to_bands(attn: Attention, q: mx.array, keys: list[mx.array], values: list[mx.array]) -> mx.array:
    """Few queries (B x Nq x D) over many keys and values in row bands ((1 or B) x n x D each) -> B x Nq x D.

    With fewer heads x queries than the projected width, the key projection moves to the query side,
    logits_h = (q_h Wk_h) . k, and the weighted sum is taken over the raw image tokens and projected by
    Wv_h afterwards (k's bias shifts every logit of a query equally, so softmax drops it; v's bias passes
    through because the weights sum to 1).
    """
    b, nq, d = q.shape
    if attn.num_heads * nq >= attn.q_proj.weight.shape[0]:  # too many queries for the key-space product
        keys = per_band(functools.partial(_project, attn, attn.k_proj), keys)
        values = per_band(functools.partial(_project, attn, attn.v_proj), values)
        return attend_to_projected_bands(attn, q, keys, values)
    q = _project(attn, attn.q_proj, q)  # B x h x Nq x c
    q_in_key_space = (q @ _per_head(attn, attn.k_proj.weight)).reshape(b, 1, -1, d)  # B x 1 x h*Nq x D
    pooled = banded_attention(q_in_key_space, [k[:, None] for k in keys], [v[:, None] for v in values],
                              q.shape[-1] ** -0.5)  # raw image tokens, weighted
    value_weight = _per_head(attn, attn.v_proj.weight)  # h x c x D
    values = pooled.reshape(b, attn.num_heads, nq, d) @ value_weight.swapaxes(1, 2)
    return _merge_heads(attn, values + attn.v_proj.bias.reshape(attn.num_heads, 1, -1))


def attend_to_projected_bands(attn: Attention, q: mx.array, keys: list[mx.array], values: list[mx.array]) -> mx.array:
    """q: B x Nq x D; keys, values: bands already projected, (1 or B) x heads x n x c each -> B x Nq x D."""
    q = _project(attn, attn.q_proj, q)
    return _merge_heads(attn, banded_attention(q, keys, values, q.shape[-1] ** -0.5))


def attend_with_projected_queries(attn: Attention, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """q: already projected, (1 or B) x heads x Nq x c, many; k, v: B x Nk x D, few -> B x Nq x D."""
    k = _project(attn, attn.k_proj, k)
    return _weighted_values(attn, (k @ q.swapaxes(-1, -2)) * k.shape[-1] ** -0.5, v)


def _attend_few_keys(attn: Attention, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
    """Many queries over a few keys: the query projection moves to the key side,
    logits_h = q . (Wq_h^T k_h) + bq_h . k_h."""
    b, nk = k.shape[:2]  # q may be one image's tokens for all B prompts
    nq, d = q.shape[1:]
    h = attn.num_heads
    k = _project(attn, attn.k_proj, k)  # B x h x Nk x c
    k_in_query_space = (k @ _per_head(attn, attn.q_proj.weight)).reshape(b, h * nk, d)
    query_bias = (k @ attn.q_proj.bias.reshape(h, -1, 1)).reshape(b, h * nk, 1)
    logits = (k_in_query_space @ q.swapaxes(1, 2) + query_bias) * k.shape[-1] ** -0.5
    return _weighted_values(attn, logits.reshape(b, h, nk, nq), v)


def _weighted_values(attn: Attention, logits: mx.array, v: mx.array) -> mx.array:
    """Logits B x heads x Nk x Nq of many queries over a few keys, values v: B x Nk x D -> B x Nq x D.

    The logits are transposed (keys first): the softmax over each head's Nk rows then runs along the
    long contiguous axis, much faster on the CPU than over rows of Nk values. The values go through
    out_proj before weighting, (v_h Wo_h^T), as Nk is small.
    """
    b, h, nk, nq = logits.shape
    d = v.shape[-1]
    weights = softmax(logits, axis=2).reshape(b, h * nk, nq)
    out_weight = attn.out_proj.weight.reshape(d, h, -1).transpose(1, 2, 0)  # h x c x D
    values = (_project(attn, attn.v_proj, v) @ out_weight).reshape(b, h * nk, d)
    return weights.swapaxes(1, 2) @ values + attn.out_proj.bias


# ------------------------------------------------------------------ layers
def _feed_forward(layer: TwoWayAttentionBlock, x: mx.array) -> mx.array:
    return linear(layer.mlp.lin2, nn.relu(linear(layer.mlp.lin1, x)))


def two_way_layer(
    layer: TwoWayAttentionBlock,
    queries: mx.array,
    keys: list[mx.array],
    query_pe: mx.array,
    key_pe: list[mx.array],
    image_side: ImageSide | None = None,
) -> tuple[mx.array, list[mx.array]]:
    """``layer(queries, keys, query_pe, key_pe)`` with the image tokens in row bands, (1 or B) x n x D each,
    and their position encodings ``key_pe`` (1 x n x D bands). Both are updated, the image band by band.

    ``image_side``: the projections of these ``keys`` (``project_image``), if already computed.
    """
    if layer.skip_first_layer_pe:  # the first layer's queries are the raw prompt embeddings
        queries = attend(layer.self_attn, queries, queries, queries)
    else:
        q = queries + query_pe
        queries = queries + attend(layer.self_attn, q, q, queries)
    queries = layer_norm(layer.norm1, queries)

    to_image, to_tokens = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    if image_side is None:
        k = per_band(mx.add, keys, key_pe)
        attn = attend_to_bands(to_image, queries + query_pe, k, keys)
    else:
        attn = attend_to_projected_bands(to_image, queries + query_pe, image_side.keys, image_side.values)
    queries = layer_norm(layer.norm2, queries + attn)
    queries = layer_norm(layer.norm3, queries + _feed_forward(layer, queries))
    prompt_keys = queries + query_pe
    if image_side is None:
        attn_bands = per_band(lambda band: attend(to_tokens, band, prompt_keys, queries), k)
    else:
        attn_bands = per_band(lambda band: attend_with_projected_queries(to_tokens, band, prompt_keys, queries),
                              image_side.queries)
    return queries, per_band(lambda band, attn: layer_norm(layer.norm4, band + attn), keys, attn_bands)


def project_image(layer: TwoWayAttentionBlock, keys: list[mx.array], key_pe: list[mx.array]) -> ImageSide:
    """Image token bands (1 x n x D each) with their projections in the layer's two cross-attentions."""
    to_image, to_tokens = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token

    def project(band: mx.array, pe: mx.array) -> tuple[mx.array, ...]:
        k = band + pe
        projections = (_project(to_image, to_image.k_proj, k), _project(to_image, to_image.v_proj, band),
                       _project(to_tokens, to_tokens.q_proj, k))
        # kept row-major: as head-split views, every prompt's attention would copy them again
        return tuple(mx.contiguous(p) for p in projections)

    return ImageSide(keys, *(list(field) for field in zip(*per_band(project, keys, key_pe))))


def shift_image(
    layer: TwoWayAttentionBlock, side: ImageSide, change: list[mx.array], weight: mx.array, offset: mx.array
) -> ImageSide:
    """``project_image`` of side.image + change @ weight + offset, from ``side``'s, for B prompts.

    change: bands of B x n x k with k well under D (a mask hint's features, ``mask_decoder.MaskHint``);
    weight: k x D, offset: D. The projections are linear, so each gains the shift's own projection W (no
    bias), computed k wide by associativity, change @ (weight W^T) + offset W^T: 3 x n x k x 128
    multiply-adds per band instead of n x D x 128 for each of the 3.
    """
    attentions = (layer.cross_attn_token_to_image, layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)
    projections = (attentions[0].k_proj, attentions[1].v_proj, attentions[2].q_proj)
    stacked = mx.concatenate([p.weight for p in projections]).T  # D x (3 x inner)
    bounds = list(itertools.accumulate(p.weight.shape[0] for p in projections))[:-1]

    def shift(image: mx.array, band: mx.array, *projected: mx.array) -> tuple[mx.array, ...]:
        shifts = mx.split(band @ (weight @ stacked) + offset @ stacked, bounds, axis=-1)
        return (image + (band @ weight + offset),
                *(p + a.split_heads(s) for p, a, s in zip(projected, attentions, shifts, strict=True)))

    fields = per_band(shift, side.image, change, side.keys, side.values, side.queries)
    return ImageSide(*(list(field) for field in zip(*fields)))


def two_way_transformer(
    transformer: TwoWayTransformer,
    image: list[mx.array],
    image_pe: list[mx.array],
    tokens: mx.array,
    image_side: ImageSide | None = None,
    outputs: Sequence[int] | None = None,
) -> tuple[mx.array, list[mx.array]]:
    """``transformer`` on image tokens in row bands, (1 or B) x n x D each, with their 1 x n x D position
    encoding bands, and tokens B x N x D -> (tokens B x M x D, image bands B x n x D).

    ``image_side``: ``project_image(transformer.layers[0], image, image_pe)`` if the caller keeps it.
    ``outputs``: the M of the N tokens the caller reads (all if None). The final attention and its
    norm are per query token, so only those are computed.
    """
    queries, keys = tokens, image
    for i, layer in enumerate(transformer.layers):
        queries, keys = two_way_layer(layer, queries, keys, tokens, image_pe, image_side if i == 0 else None)
    if outputs is not None:
        rows = mx.array(outputs)
        queries, tokens = queries[:, rows], tokens[:, rows]
    attn = attend_to_bands(transformer.final_attn_token_to_image, queries + tokens, per_band(mx.add, keys, image_pe),
                           keys)
    return layer_norm(transformer.norm_final_attn, queries + attn), keys
