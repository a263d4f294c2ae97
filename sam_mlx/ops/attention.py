"""Softmax attention for every SAM component, fast on MLX's CPU backend too.

On a GPU this is ``mx.fast.scaled_dot_product_attention`` (one fused kernel). On the
CPU that kernel falls back to matmul, softmax, matmul over the whole logit tensor,
and two things make it slow: MLX's CPU ``exp`` and logit tensors far larger than the
caches (12 x 4096 x 4096 floats = 805 MB per global ViT block). So on the CPU:

- the logits are computed in chunks of ~2 MB (rows of queries, heads, batch entries),
  and each chunk goes through bias, max, exp, sum and the value matmul while in cache;
- exp is ``elementwise.shifted_exp``, a fused polynomial (accurate to ~2e-7 relative).

SAM's decomposed relative-position term is added per chunk from its two per-axis
parts, so the full Lq x Lk bias is never built. On a GPU the fused kernel takes that term as
its mask, built for one chunk of query rows at a time (``GPU_MASK_BYTES``), chunk after chunk.
"""

from __future__ import annotations

import functools
import itertools
import operator

import mlx.core as mx

from . import backend
from .bands import chunk_streams, per_band
from .elementwise import fused, shifted_exp

_CHUNK_LOGITS = 1 << 19  # logits per CPU chunk: 2 MB of float32 stays in L2/L3
# Bytes of relative-position mask per chunk of query rows on a GPU: ViT-H's global block at 1024 would
# otherwise build a 512 MiB heads x T x T mask (8 GiB at stretch 2048); in 64 MiB chunks the fused kernel
# still gets hundreds of query rows per call.
GPU_MASK_BYTES = 64 << 20


@fused
def _add_decomposed(logits: mx.array, bias_h: mx.array, bias_w: mx.array) -> mx.array:
    """... x Kh x Kw logits plus bias_h (... x Kh) along rows and bias_w (... x Kw) along columns."""
    return logits + bias_h[..., :, None] + bias_w[..., None, :]


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax along ``axis``, with the fused exp on the CPU (computed in float32, returned in x's dtype)."""
    if not backend.on_cpu():
        return mx.softmax(x, axis=axis, precise=True)
    x32 = x.astype(mx.float32)
    weights = shifted_exp(x32, x32.max(axis=axis, keepdims=True))
    return (weights / weights.sum(axis=axis, keepdims=True)).astype(x.dtype)


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | None = None,
    rel_pos: tuple[mx.array, mx.array] | None = None,
    spread: bool = False,
) -> mx.array:
    """softmax(q k^T * scale + mask + relative-position term) v.

    q: B x heads x Lq x d; k, v: B x heads x Lk x d -> B x heads x Lq x d.
    mask: additive logits broadcastable to B x heads x Lq x Lk.
    rel_pos: (bias_h, bias_w) of shapes B x heads x Lq x Kh and B x heads x Lq x Kw with
    Kh * Kw = Lk (keys laid out row-major on a Kh x Kw grid): the logit of query i and key
    (y, x) gets bias_h[i, y] + bias_w[i, x].
    ``spread``: on the CPU, deal the chunks out over the row bands' streams (``bands``), one per core
    (for a caller whose ops are not already in bands).
    """
    if not backend.on_cpu():
        if rel_pos is None:
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return _fused_with_rel_pos(q, k, v, scale, mask, rel_pos)
    # float32 (half precision is slower on the CPU and ``shifted_exp`` needs it), row-major once rather
    # than inside each chunk's matmul (k^T is then a free transposed view)
    q32, k32, v32 = (t.astype(mx.float32) for t in (q, k, v))
    k_t = mx.contiguous(k32).swapaxes(2, 3)
    streams = chunk_streams(spread)
    out = _chunked_attention(mx.contiguous(q32 * scale), k_t, mx.contiguous(v32), mask, rel_pos, streams)
    return out.astype(q.dtype)


def _fused_with_rel_pos(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None, rel_pos: tuple[mx.array, mx.array]
) -> mx.array:
    """The fused kernel with the relative-position term as its mask, for chunks of query rows in turn.

    Each chunk builds only its rows of the B x heads x Lq x Lk mask from its rows of the per-axis terms;
    each chunk's queries depend on the last chunk's output, so MLX evaluates them one after another and
    frees each mask before the next is built (peak: one chunk's mask, not the whole).
    """
    bias_h, bias_w = rel_pos
    batch, heads, queries = bias_h.shape[:3]
    keys = k.shape[2]
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    rows = max(1, GPU_MASK_BYTES // (batch * heads * keys * q.dtype.size))
    parts: list[mx.array] = []
    for r0 in range(0, queries, rows):
        rs = slice(r0, r0 + rows)
        q_part, h_part, w_part = q[:, :, rs], bias_h[:, :, rs], bias_w[:, :, rs]
        if parts:  # after the previous chunk
            q_part, h_part, w_part = mx.depends([q_part, h_part, w_part], [parts[-1]])
        full = (h_part[..., :, None] + w_part[..., None, :]).reshape(*h_part.shape[:3], keys).astype(q.dtype)
        if mask is not None:
            full = full + mask[:, :, rs] if mask.shape[2] > 1 else full + mask
        parts.append(mx.fast.scaled_dot_product_attention(q_part, k, v, scale=scale, mask=full))
    return _join(parts, axis=2)


def banded_attention(q: mx.array, keys: list[mx.array], values: list[mx.array], scale: float) -> mx.array:
    """softmax(q k^T * scale) v for a few queries over keys and values cut in row bands (``bands``).

    q: ... x Lq x d; keys[i], values[i]: ... x n_i x d (batch axes broadcast) -> ... x Lq x d.
    Each band computes, on its own stream, its logits' maximum m_i, the sum s_i of exp(logit - m_i)
    and those weights times its values o_i; only these small parts are joined, with the overall
    maximum m: (sum_i o_i e^(m_i - m)) / (sum_i s_i e^(m_i - m)), so no step over all keys runs on
    one core alone. Computed in float32, returned in q's dtype.
    """
    q32 = (q * scale).astype(mx.float32)

    def band_part(k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        logits = q32 @ k.astype(mx.float32).swapaxes(-1, -2)
        top = logits.max(axis=-1, keepdims=True)
        weights = _exp_below(logits, top)
        return top, weights.sum(axis=-1, keepdims=True), weights @ v.astype(mx.float32)

    tops, totals, pooled = zip(*per_band(band_part, keys, values))
    top = functools.reduce(mx.maximum, tops)
    rescales = [mx.exp(t - top) for t in tops]
    total = functools.reduce(operator.add, [s * r for s, r in zip(totals, rescales)])
    out = functools.reduce(operator.add, [o * r for o, r in zip(pooled, rescales)])
    return (out / total).astype(q.dtype)


def _exp_below(x: mx.array, top: mx.array) -> mx.array:
    """exp(x - top) for float32 x <= top (broadcast): ``shifted_exp`` on the CPU."""
    return shifted_exp(x, top) if backend.on_cpu() else mx.exp(x - top)


def _chunk_sizes(batch: int, heads: int, queries: int, keys: int) -> tuple[int, int, int]:
    """(batch entries, heads, query rows) per chunk so a chunk holds about _CHUNK_LOGITS logits."""
    per_head = queries * keys
    if per_head >= _CHUNK_LOGITS:
        return 1, 1, max(1, _CHUNK_LOGITS // keys)
    head_count = min(heads, _CHUNK_LOGITS // per_head)
    if head_count < heads:
        return 1, head_count, queries
    return max(1, _CHUNK_LOGITS // (heads * per_head)), heads, queries


def _part(x: mx.array, batch: slice, heads: slice, rows: slice) -> mx.array:
    """Slice B x heads x L x ... arrays; size-1 (broadcast) batch or head axes are kept whole."""
    return x[batch if x.shape[0] > 1 else slice(None), heads if x.shape[1] > 1 else slice(None), rows]


def _chunked_attention(
    q: mx.array,
    k_t: mx.array,
    v: mx.array,
    mask: mx.array | None,
    rel_pos: tuple[mx.array, mx.array] | None,
    streams: list[mx.Stream],
) -> mx.array:
    """Attention of pre-scaled q (B x n x Lq x d) over k_t (B x n x d x Lk), chunk by chunk, chunk i on
    ``streams[i % len(streams)]``."""
    batch, heads, queries, _ = q.shape
    keys = k_t.shape[-1]
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    nb, nh, nr = _chunk_sizes(batch, heads, queries, keys)
    stream_cycle = itertools.cycle(streams)
    per_batch = []
    for b0 in range(0, batch, nb):
        bs = slice(b0, b0 + nb)
        per_head = []
        for h0 in range(0, heads, nh):
            hs = slice(h0, h0 + nh)
            k_part, v_part = k_t[bs, hs], v[bs, hs]
            per_rows = []
            for r0 in range(0, queries, nr):
                rs = slice(r0, r0 + nr)
                with mx.stream(next(stream_cycle)):
                    logits = q[bs, hs, rs] @ k_part
                    if rel_pos is not None:
                        bias_h, bias_w = (_part(t, bs, hs, rs) for t in rel_pos)
                        grid = logits.reshape(*logits.shape[:3], bias_h.shape[-1], bias_w.shape[-1])
                        logits = _add_decomposed(grid, bias_h, bias_w).reshape(logits.shape)
                    if mask is not None:
                        logits = logits + _part(mask, bs, hs, rs)
                    weights = shifted_exp(logits, logits.max(axis=-1, keepdims=True))
                    per_rows.append((weights @ v_part) / weights.sum(axis=-1, keepdims=True))
            per_head.append(_join(per_rows, axis=2))
        per_batch.append(_join(per_head, axis=1))
    return _join(per_batch, axis=0)


def _join(parts: list[mx.array], axis: int) -> mx.array:
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=axis)
