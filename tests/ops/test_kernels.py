"""The CPU kernels (attention, exp, softmax, GELU, LayerNorm, Linear) against plain float64 references and
against MLX's own formulation (the GPU branch, and what the plain model uses)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from sam_mlx.ops import attention as attention_module
from sam_mlx.ops import backend, layers
from sam_mlx.ops.attention import attention, banded_attention, softmax
from sam_mlx.ops.backend import keep_prompt_buffers
from sam_mlx.ops.elementwise import gelu, shifted_exp
from sam_mlx.ops.layers import layer_norm, linear

RNG = np.random.default_rng(0)


def _softmax64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _attention64(q, k, v, scale, bias):
    logits = q.astype(np.float64) @ np.swapaxes(k, -1, -2) * scale + bias
    return _softmax64(logits) @ v


@pytest.mark.parametrize("chunk_logits", [1 << 19, 5000, 300, 40])  # default, then batch / head / row chunks
def test_chunked_attention_matches_float64(monkeypatch, chunk_logits):
    monkeypatch.setattr(attention_module, "_CHUNK_LOGITS", chunk_logits)
    b, n, gh, gw, d = 3, 2, 4, 5, 8
    q, k, v = (RNG.normal(size=(b, n, gh * gw, d)).astype(np.float32) for _ in range(3))
    bias_h = RNG.normal(size=(b, n, gh * gw, gh)).astype(np.float32)
    bias_w = RNG.normal(size=(b, n, gh * gw, gw)).astype(np.float32)
    mask = RNG.normal(size=(n, gh * gw, gh * gw)).astype(np.float32)
    full = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(b, n, gh * gw, -1) + mask
    got = attention(mx.array(q), mx.array(k), mx.array(v), 0.3, mask=mx.array(mask),
                    rel_pos=(mx.array(bias_h), mx.array(bias_w)))
    np.testing.assert_allclose(np.array(got), _attention64(q, k, v, 0.3, full), atol=2e-6)


def test_cpu_attention_equals_fused_kernel_path(monkeypatch):
    """The GPU branch (mx.fast.scaled_dot_product_attention with the relative-position term
    expanded to a mask) and the CPU chunks agree; both run here on the CPU."""
    q, k, v = (mx.array(RNG.normal(size=(2, 3, 36, 16)).astype(np.float32)) for _ in range(3))
    rel_pos = (mx.array(RNG.normal(size=(2, 3, 36, 6)).astype(np.float32)),
               mx.array(RNG.normal(size=(2, 3, 36, 6)).astype(np.float32)))
    chunked = attention(q, k, v, 0.25, rel_pos=rel_pos)
    monkeypatch.setattr(backend, "on_cpu", lambda: False)
    fused = attention(q, k, v, 0.25, rel_pos=rel_pos)
    np.testing.assert_allclose(np.array(chunked), np.array(fused), atol=2e-6)


def test_shifted_exp():
    """exp(z - shift) for z <= shift (a softmax's maximum): full float32 precision down to underflow."""
    z = np.concatenate([np.linspace(-110, 0, 200001), [-1e4, -np.inf]]).astype(np.float32) + np.float32(30.0)
    got = np.array(shifted_exp(mx.array(z), mx.array(30.0)))
    expected = np.exp(z.astype(np.float64) - 30.0)
    normal = expected > 1e-37
    np.testing.assert_allclose(got[normal], expected[normal], rtol=3e-7)
    assert np.all((got[~normal] >= 0) & (got[~normal] <= 1e-37))
    assert got[-1] == 0.0 and got[-2] == 0.0 and got[200000] == 1.0


@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax(axis):
    x = (RNG.normal(size=(3, 7, 50)) * 20).astype(np.float32)
    np.testing.assert_allclose(np.array(softmax(mx.array(x), axis=axis)), _softmax64(x, axis), atol=1e-6)


def test_gelu_is_exact_gelu():
    x = np.concatenate([np.linspace(-12, 12, 240001), [1e4, -1e4, 1e30, -1e30, 3e38, -3e38]]).astype(np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()
    got = np.array(gelu(mx.array(x)))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=1e-6)
    assert np.all(got[x < -6] <= 0) and np.all(got[x < -1e3] == 0.0)
    half = np.array(gelu(mx.array(x[:1000]).astype(mx.bfloat16)).astype(mx.float32))
    np.testing.assert_allclose(half, expected[:1000], atol=0.05)


@pytest.mark.parametrize("dims", [64, 256, 768])
def test_layer_norm_matches_mlx(dims):
    norm = nn.LayerNorm(dims, eps=1e-6)
    norm.weight = mx.array(RNG.normal(size=dims).astype(np.float32))
    norm.bias = mx.array(RNG.normal(size=dims).astype(np.float32))
    x = mx.array((RNG.normal(size=(2, 33, dims)) * 3 + 5).astype(np.float32))
    expected = norm(x)  # MLX's fused kernel
    np.testing.assert_allclose(np.array(layer_norm(norm, x)), np.array(expected), atol=2e-5)


@pytest.mark.parametrize(
    "shape, in_dim, out_dim, blocked",
    [
        ((7, 256), 256, 2048, True),  # the decoder's token MLP, a point prompt's 7 tokens
        ((1, 7, 2048), 2048, 256, True),
        ((2, 10, 256), 256, 2048, True),
        ((1, 7, 256), 256, 256, False),  # small enough for OpenBLAS's small-matrix kernels as is
        ((64, 256), 256, 2048, False),  # past layers._FEW_ROWS
        ((7, 256), 256, 8 * 105, True),  # blocks of 105 columns
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_in_column_blocks_equals_the_product(shape, in_dim, out_dim, blocked, bias):
    rows = math.prod(shape[:-1])
    assert (layers._column_block(rows, out_dim, in_dim) < out_dim) == blocked
    layer = nn.Linear(in_dim, out_dim, bias=bias)
    x = RNG.normal(size=shape).astype(np.float32)
    weight = np.array(layer.weight).astype(np.float64)
    expected = x @ weight.T + (np.array(layer.bias) if bias else 0.0)
    got = linear(layer, mx.array(x))
    assert got.shape == (*shape[:-1], out_dim)
    np.testing.assert_allclose(np.array(got), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_inputs_computed_in_float32(dtype):
    """Softmax, attention and LayerNorm take and return half precision; inside they compute in float32."""
    tol = 2e-3 if dtype == mx.float16 else 1.6e-2  # about one rounding to the half type, relative
    x = (RNG.normal(size=(2, 3, 40, 16)) * 4).astype(np.float32)
    half = mx.array(x).astype(dtype)
    exact = half.astype(mx.float32)
    got = softmax(half)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(softmax(exact)), rtol=tol, atol=1e-6)
    got = attention(half, half, half, 0.25)
    assert got.dtype == dtype
    expected = attention(exact, exact, exact, 0.25)
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(expected), rtol=tol, atol=tol)
    norm = nn.LayerNorm(16)
    big = (half * 300).astype(dtype)  # squares beyond float16's range
    got = layer_norm(norm, big)
    assert got.dtype == dtype
    expected = layer_norm(norm, big.astype(mx.float32))
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(expected), rtol=tol, atol=tol)


@pytest.mark.parametrize("bands", [1, 2, 3])
def test_banded_attention_large_logits(bands):
    """Bands whose logits differ by hundreds (exp of the largest overflows float32) are joined without overflow."""
    q = RNG.normal(size=(2, 4, 5, 16)).astype(np.float32)
    k = RNG.normal(size=(2, 4, 90, 16)).astype(np.float32)
    k[:, :, 60:] *= 8  # the last band's logits far above the others'
    v = RNG.normal(size=(2, 4, 90, 16)).astype(np.float32)
    cut = [[mx.array(part) for part in np.array_split(x, bands, axis=2)] for x in (k, v)]
    got = np.array(banded_attention(mx.array(q), *cut, 10.0))
    np.testing.assert_allclose(got, _attention64(q, k, v, 10.0, 0.0), atol=2e-5)


def test_keep_prompt_buffers_raises_the_cpu_cache_never_lowers_it():
    before = mx.set_cache_limit(32 << 20)  # MLX's CPU default
    try:
        keep_prompt_buffers()
        assert mx.set_cache_limit(1 << 30) == (256 << 20 if backend.on_cpu() else 32 << 20)
        keep_prompt_buffers()
        assert mx.set_cache_limit(before) == 1 << 30
    finally:
        mx.set_cache_limit(before)
