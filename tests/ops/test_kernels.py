"""The CPU kernels (attention, exp, GELU, LayerNorm, Linear, prompt/image attention, prompt groups)
against plain float64 references and against the straightforward MLX formulation; bands and BLAS threads."""

from __future__ import annotations

import math
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from conftest import MOBILE_SAM

from sam_mlx import SamPredictor
from sam_mlx.modeling import mask_decoder
from sam_mlx.ops import bands as token_bands
from sam_mlx.ops import blas as _blas
from sam_mlx.ops import layers
from sam_mlx.ops import attention as attention_module
from sam_mlx import predictor as predictor_module
from sam_mlx.ops.attention import attention, banded_attention, shifted_exp, softmax
from sam_mlx.checkpoints.load import load_checkpoint
from sam_mlx.config import PromptDecoderConfig, ViTConfig
from sam_mlx.modeling.image_encoder import ImageEncoderViT
from sam_mlx.ops.layers import LayerNorm, Linear, gelu, keep_prompt_buffers, on_cpu
from sam_mlx.modeling.mask_decoder import MaskDecoder
from sam_mlx.modeling.prompt_encoder import PromptEncoder
from sam_mlx.transforms import image_geometry
from sam_mlx.modeling.two_way_transformer import DownsampledAttention

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
    monkeypatch.setattr(attention_module, "on_cpu", lambda: False)
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
    norm = LayerNorm(dims, eps=1e-6)
    norm.weight = mx.array(RNG.normal(size=dims).astype(np.float32))
    norm.bias = mx.array(RNG.normal(size=dims).astype(np.float32))
    x = mx.array((RNG.normal(size=(2, 33, dims)) * 3 + 5).astype(np.float32))
    expected = nn.LayerNorm.__call__(norm, x)  # MLX's fused kernel
    np.testing.assert_allclose(np.array(norm(x)), np.array(expected), atol=2e-5)


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
    linear = Linear(in_dim, out_dim, bias=bias)
    x = RNG.normal(size=shape).astype(np.float32)
    weight = np.array(linear.weight).astype(np.float64)
    expected = x @ weight.T + (np.array(linear.bias) if bias else 0.0)
    got = linear(mx.array(x))
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
    norm = LayerNorm(16)
    big = (half * 300).astype(dtype)  # squares beyond float16's range
    got = norm(big)
    assert got.dtype == dtype
    expected = norm(big.astype(mx.float32))
    np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(expected), rtol=tol, atol=tol)


def _reference_attention(layer: DownsampledAttention, q, k, v) -> np.ndarray:
    """Project, split heads, attend, merge, project: the textbook order, in float64."""
    def linear(x, lin):
        return x.astype(np.float64) @ np.array(lin.weight, np.float64).T + np.array(lin.bias, np.float64)

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], layer.num_heads, -1).transpose(0, 2, 1, 3)

    qh, kh, vh = heads(linear(q, layer.q_proj)), heads(linear(k, layer.k_proj)), heads(linear(v, layer.v_proj))
    out = _attention64(qh, kh, vh, qh.shape[-1] ** -0.5, 0.0)
    b, h, n, c = out.shape
    return linear(out.transpose(0, 2, 1, 3).reshape(b, n, h * c), layer.out_proj)


def _random_biases(layer: DownsampledAttention) -> DownsampledAttention:
    for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
        lin.bias = mx.array(RNG.normal(size=lin.bias.shape).astype(np.float32))
    return layer


def _bands(x: np.ndarray, count: int) -> list[mx.array]:
    """B x N x D tokens cut into ``count`` bands of consecutive tokens."""
    return [mx.array(part) for part in np.array_split(x, count, axis=1)]


@pytest.mark.parametrize("nq,nk", [(300, 7), (12, 12), (300, 40)])  # few keys, neither, too many keys for the shortcut
def test_downsampled_attention_paths(nq, nk):
    layer = _random_biases(DownsampledAttention(64, num_heads=4, downsample_rate=2))
    q = RNG.normal(size=(2, nq, 64)).astype(np.float32)
    k = RNG.normal(size=(2, nk, 64)).astype(np.float32)
    v = RNG.normal(size=(2, nk, 64)).astype(np.float32)
    got = np.array(layer(mx.array(q), mx.array(k), mx.array(v)))
    np.testing.assert_allclose(got, _reference_attention(layer, q, k, v), atol=2e-5)


@pytest.mark.parametrize("bands", [1, 2, 3])
@pytest.mark.parametrize("nq", [7, 20])  # the key-space product, projected keys (4 heads x 20 > 32 wide)
def test_attention_to_banded_keys(nq, bands):
    """Few queries over keys cut in bands, each band on its own stream, equal attention over all keys."""
    layer = _random_biases(DownsampledAttention(64, num_heads=4, downsample_rate=2))
    q = RNG.normal(size=(2, nq, 64)).astype(np.float32)
    k = RNG.normal(size=(2, 300, 64)).astype(np.float32)
    v = RNG.normal(size=(2, 300, 64)).astype(np.float32)
    got = np.array(layer.to_bands(mx.array(q), _bands(k, bands), _bands(v, bands)))
    np.testing.assert_allclose(got, _reference_attention(layer, q, k, v), atol=2e-5)


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


@pytest.mark.parametrize("bands", [1, 2])
def test_attention_with_one_side_projected(bands):
    """The per-image shortcuts: image-side projections made once (batch 1) serve a batch of prompts."""
    layer = _random_biases(DownsampledAttention(64, num_heads=4, downsample_rate=2))
    image = RNG.normal(size=(1, 300, 64)).astype(np.float32)
    prompts = RNG.normal(size=(3, 7, 64)).astype(np.float32)
    images = np.broadcast_to(image, (3, 300, 64))
    x, p = _bands(image, bands), mx.array(prompts)
    keys = [layer.project(layer.k_proj, band) for band in x]
    got = layer.to_projected_bands(p, keys, [layer.project(layer.v_proj, band) for band in x])
    np.testing.assert_allclose(np.array(got), _reference_attention(layer, prompts, images, images), atol=2e-5)
    got = layer.attend_projected_queries(layer.project(layer.q_proj, mx.array(image)), p, p)
    np.testing.assert_allclose(np.array(got), _reference_attention(layer, images, prompts, prompts), atol=2e-5)


def _random_decoder() -> MaskDecoder:
    decoder = MaskDecoder(PromptDecoderConfig())
    params = decoder.parameters()
    mx.eval(params)
    decoder.update(nn.utils.tree_map(lambda p: mx.array(RNG.normal(size=p.shape).astype(np.float32) * 0.05), params))
    return decoder


def _random_decoder_inputs(d: int, grid: tuple[int, int], prompts: int) -> tuple[mx.array, ...]:
    """Image tokens 1 x h x w x d, their position encoding h x w x d, a "no mask" embedding 1 x d and
    prompt embeddings B x 3 x d, all random."""
    shapes = ((1, *grid, d), (*grid, d), (1, d), (prompts, 3, d))
    return tuple(mx.array(RNG.normal(size=shape).astype(np.float32)) for shape in shapes)


def test_image_side_kept_per_image_equals_full_decode():
    """Prompts without a mask hint, decoded with the image side projected once, equal a full decode."""
    decoder = _random_decoder()
    d = decoder.iou_token.shape[-1]
    tokens, pe, no_mask, sparse = _random_decoder_inputs(d, (8, 8), 6)
    dense = mx.broadcast_to(no_mask.reshape(1, 1, 1, d), (6, 8, 8, d))
    image_side = decoder.project_image(tokens, pe, no_mask)
    for multimask in (True, False):
        masks, iou = decoder(tokens, pe, sparse, dense, multimask)
        kept_masks, kept_iou = decoder(tokens, pe, sparse, dense, multimask, image_side)
        np.testing.assert_allclose(np.array(kept_masks), np.array(masks), atol=1e-5)
        np.testing.assert_allclose(np.array(kept_iou), np.array(iou), atol=1e-5)


@pytest.mark.parametrize("outputs", [[0, 2, 3, 4], [0, 1], [6]])
def test_transformer_computes_only_the_tokens_read(outputs):
    """The final attention run only for the tokens the decoder reads gives those tokens' rows of the full
    run (the IoU token with masks 1-3 or mask 0, or a prompt token), and the same image tokens."""
    transformer = _random_decoder().transformer
    d = transformer.norm_final_attn.weight.shape[0]
    image, pe, _, tokens = _random_decoder_inputs(d, (6, 4), 2)
    tokens = mx.concatenate([tokens, tokens[:, ::-1] * 0.5, tokens[:, :1]], axis=1)  # 7 tokens
    image_bands, pe_bands = token_bands.row_bands(image, 2), token_bands.row_bands(pe[None], 2)
    all_tokens, all_image = transformer(image_bands, pe_bands, tokens)
    read, read_image = transformer(image_bands, pe_bands, tokens, outputs=outputs)
    assert read.shape == (2, len(outputs), d)
    np.testing.assert_allclose(np.array(read), np.array(all_tokens[:, mx.array(outputs)]), atol=1e-5)
    for got, expected in zip(read_image, all_image, strict=True):
        np.testing.assert_array_equal(np.array(got), np.array(expected))


def test_keep_prompt_buffers_raises_the_cpu_cache_never_lowers_it():
    before = mx.set_cache_limit(32 << 20)  # MLX's CPU default
    try:
        keep_prompt_buffers()
        assert mx.set_cache_limit(1 << 30) == (256 << 20 if on_cpu() else 32 << 20)
        keep_prompt_buffers()
        assert mx.set_cache_limit(before) == 1 << 30
    finally:
        mx.set_cache_limit(before)


def test_prompt_groups_equal_one_at_a_time():
    """9 prompts decoded together (in groups on the CPU) equal each decoded alone."""
    decoder = _random_decoder()
    d = decoder.iou_token.shape[-1]
    tokens, pe, _, sparse = _random_decoder_inputs(d, (8, 8), 9)
    dense = mx.array(RNG.normal(size=(9, 8, 8, d)).astype(np.float32))
    masks, iou = decoder(tokens, pe, sparse, dense, True)
    assert masks.shape == (9, 3, 32, 32) and iou.shape == (9, 3)
    for i in range(9):
        one_masks, one_iou = decoder(tokens, pe, sparse[i : i + 1], dense[i : i + 1], True)
        np.testing.assert_allclose(np.array(masks[i]), np.array(one_masks[0]), atol=1e-5)
        np.testing.assert_allclose(np.array(iou[i]), np.array(one_iou[0]), atol=1e-5)
    assert math.isfinite(float(masks.abs().max()))


@pytest.mark.parametrize("bands", [2, 3, 5])
def test_token_bands_equal_one_band(monkeypatch, bands):
    """The decoder with its image tokens cut in row bands, each on its own stream (uneven on a 7 x 5 grid),
    equals one band: with the kept image side, and with per-prompt mask hints."""
    decoder = _random_decoder()
    d = decoder.iou_token.shape[-1]
    tokens, pe, no_mask, sparse = _random_decoder_inputs(d, (7, 5), 4)
    hints = mx.array(RNG.normal(size=(4, 7, 5, d)).astype(np.float32))
    no_hints = mx.broadcast_to(no_mask.reshape(1, 1, 1, d), hints.shape)

    def decode(count: int) -> list[np.ndarray]:
        monkeypatch.setattr(mask_decoder, "band_count", lambda: count)
        monkeypatch.setattr(token_bands, "band_count", lambda: count)
        with token_bands.parallel_bands():
            image_side = decoder.project_image(tokens, pe, no_mask)
            assert len(image_side.image) == count and sum(b.shape[1] for b in image_side.image) == 7 * 5
            kept_side = decoder(tokens, pe, sparse, no_hints, True, image_side)
            return [np.array(o) for o in (*kept_side, *decoder(tokens, pe, sparse, hints, False))]

    for got, expected in zip(decode(bands), decode(1), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("bands", [1, 2, 3])
@pytest.mark.parametrize("read_grid", [None, (5, 4)])
def test_mask_hint_shifting_the_kept_image_side_equals_a_full_decode(monkeypatch, bands, read_grid):
    """Prompts with mask hints, decoded from the per-image side shifted by each hint's rank-16 change
    (hint features in row bands, prompts in groups), equal a full decode of the hints' dense embeddings."""
    monkeypatch.setattr(mask_decoder, "band_count", lambda: bands)
    monkeypatch.setattr(token_bands, "band_count", lambda: bands)
    decoder, prompt_encoder = _random_decoder(), PromptEncoder(PromptDecoderConfig())
    prompt_encoder.update(nn.utils.tree_map(
        lambda p: mx.array(RNG.normal(size=p.shape).astype(np.float32) * 0.3), prompt_encoder.parameters()))
    d = decoder.iou_token.shape[-1]
    tokens, pe, _, sparse = _random_decoder_inputs(d, (7, 5), 3)
    masks = mx.array(RNG.normal(size=(3, 28, 20, 1)).astype(np.float32) * 4)
    _, dense = prompt_encoder(None, None, masks, (112, 80), (7, 5))
    with token_bands.parallel_bands():
        side = decoder.project_image(tokens, pe, prompt_encoder.no_mask_embed)
        hint = prompt_encoder.mask_hint(masks)
        assert [b.shape for b in side.image] == [(1, (7 * (i + 1) // bands - 7 * i // bands) * 5, d) for i in range(bands)]
        for multimask in (True, False):
            expected = decoder(tokens, pe, sparse, dense, multimask, read_grid=read_grid)
            got = decoder(tokens, pe, sparse, dense, multimask, side, read_grid, hint)
            for g, e in zip(got, expected, strict=True):  # the random decoder's outputs are ~0.02-0.05
                np.testing.assert_allclose(np.array(g), np.array(e), atol=1e-5 * float(e.abs().max()))
    # the hint's change is the dense embedding less "no mask", in factored form
    change = hint.features @ hint.weight + hint.offset
    np.testing.assert_allclose(np.array(change + prompt_encoder.no_mask_embed[0]), np.array(dense), atol=1e-5)


@pytest.mark.parametrize("bands", [1, 2, 3])
@pytest.mark.parametrize("read_grid", [(5, 4), (7, 3), (2, 5), (1, 1), (7, 5)])
def test_masks_of_the_tokens_read_equal_that_part_of_the_full_masks(monkeypatch, bands, read_grid):
    """Masks of the top-left rows x cols tokens only (bands re-cut evenly over that part) equal that part
    of the full masks, with the same IoU predictions: with the kept image side, with hints, in prompt groups."""
    monkeypatch.setattr(mask_decoder, "band_count", lambda: bands)
    monkeypatch.setattr(token_bands, "band_count", lambda: bands)
    decoder = _random_decoder()
    d = decoder.iou_token.shape[-1]
    tokens, pe, no_mask, sparse = _random_decoder_inputs(d, (7, 5), 3)
    hints = mx.array(RNG.normal(size=(3, 7, 5, d)).astype(np.float32))
    no_hints = mx.broadcast_to(no_mask.reshape(1, 1, 1, d), hints.shape)
    rows, cols = read_grid
    with token_bands.parallel_bands():
        image_side = decoder.project_image(tokens, pe, no_mask)
        for dense, side, multimask in ((no_hints, image_side, True), (hints, None, False)):
            masks, iou = decoder(tokens, pe, sparse, dense, multimask, side)
            part, part_iou = decoder(tokens, pe, sparse, dense, multimask, side, read_grid)
            assert part.shape == (3, masks.shape[1], 4 * rows, 4 * cols)
            np.testing.assert_allclose(np.array(part), np.array(masks[..., : 4 * rows, : 4 * cols]), atol=1e-5)
            np.testing.assert_array_equal(np.array(part_iou), np.array(iou))


@pytest.mark.parametrize("bands,rows,cols", [(2, 5, 4), (3, 7, 2), (3, 2, 5), (2, 1, 1), (4, 7, 5)])
def test_top_left_bands_recut_the_part_evenly(bands, rows, cols):
    grid = mx.arange(2 * 7 * 5 * 3).reshape(2, 7, 5, 3)
    recut = token_bands.top_left_bands(token_bands.row_bands(grid, bands), 5, rows, cols)
    count = min(bands, rows)
    assert [b.shape[1] // cols for b in recut] == [rows * (i + 1) // count - rows * i // count for i in range(count)]
    joined = np.concatenate([np.array(b).reshape(2, -1, cols, 3) for b in recut], axis=1)
    np.testing.assert_array_equal(joined, np.array(grid)[:, :rows, :cols])


@pytest.mark.parametrize("bands", [2, 3])
def test_vit_in_bands_equals_one_band(monkeypatch, bands):
    """The ViT with its per-token work in row bands and its attention chunks spread over the bands' streams
    equals one band: windowed blocks (windows padded after the norm) and a global one, on a 7 x 5 grid."""
    monkeypatch.setattr(attention_module, "_CHUNK_LOGITS", 64)  # several chunks to spread
    config = ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attention_blocks=(1,), mlp_dim=64, window_size=3)
    vit = ImageEncoderViT(config)
    params = vit.parameters()
    mx.eval(params)
    vit.update(nn.utils.tree_map(lambda p: mx.array(RNG.normal(size=p.shape).astype(np.float32) * 0.2), params))
    image = mx.array(RNG.normal(size=(1, 7 * 16, 5 * 16, 3)).astype(np.float32))

    def encode(count: int) -> np.ndarray:
        monkeypatch.setattr(token_bands, "band_count", lambda: count)
        with token_bands.parallel_bands():
            return np.array(vit(image))

    np.testing.assert_allclose(encode(bands), encode(1), atol=1e-5)


def test_band_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAM_MLX_BANDS", "3")
    assert token_bands.band_count() == (3 if on_cpu() else 1)
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("SAM_MLX_BANDS", bad)
        if on_cpu():
            with pytest.raises(ValueError, match=f"SAM_MLX_BANDS .*got '{bad}'"):
                token_bands.band_count()
    monkeypatch.setenv("SAM_MLX_BANDS", "1")
    library = _blas._library
    if library is not None:  # one band: BLAS keeps its threads
        threads = library.openblas_get_num_threads()
        with token_bands.parallel_bands():
            assert library.openblas_get_num_threads() == threads


def test_row_bands_are_whole_rows_capped_at_the_rows():
    grid = mx.arange(2 * 3 * 2).reshape(2, 3, 2, 1)
    bands = token_bands.row_bands(grid, 5)
    assert [b.shape for b in bands] == [(2, 2, 1)] * 3
    assert np.array_equal(np.concatenate([np.array(b) for b in bands], axis=1), np.array(grid).reshape(2, 6, 1))
    assert [b.shape[1] for b in token_bands.row_bands(grid, 2)] == [2, 4]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sam_mlx loads OpenBLAS on Linux only")
def test_mlx_work_around_prompts_runs_blas_single_threaded(monkeypatch):
    """The image side's projections, the decode, every-pixel mask upscaling and ``return_logits``' upscaling all
    evaluate with OpenBLAS on one thread: after a multi-threaded product its workers spin on for a while, and
    took ~0.5-0.8 of a core from the next prompts."""
    library = _blas._library
    assert library is not None, "no system OpenBLAS loaded (install libopenblas0-pthread)"
    predictor = SamPredictor(load_checkpoint(MOBILE_SAM))
    monkeypatch.setattr(token_bands, "band_count", lambda: 2)
    monkeypatch.setattr(mask_decoder, "band_count", lambda: 2)
    threads_at_eval, threads_at_upscale = [], []
    evaluate, upscale = mx.eval, predictor_module.upscale_mask_logits

    def counting_eval(*arrays):
        threads_at_eval.append(library.openblas_get_num_threads())
        return evaluate(*arrays)

    def counting_upscale(*args):
        threads_at_upscale.append(library.openblas_get_num_threads())
        return upscale(*args)

    monkeypatch.setattr(mx, "eval", counting_eval)
    monkeypatch.setattr(predictor_module, "upscale_mask_logits", counting_upscale)
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(2)
    try:
        predictor.set_image_tokens(mx.array(RNG.normal(size=(1, 64, 64, 256)).astype(np.float32)),
                                   image_geometry((1200, 1800)))
        predictor.predict(np.array([[900.0, 600.0]]), np.array([1]), return_logits=True)
        noise = RNG.normal(size=(3, 256, 256)).astype(np.float32) * 3  # every pixel interpolated
        assert predictor.masks_above(noise, (0.0,))[0].shape == (3, 1200, 1800)
        assert library.openblas_get_num_threads() == 2
    finally:
        library.openblas_set_num_threads(before)
    assert len(threads_at_eval) == 3 and len(threads_at_upscale) == 1  # image side, decode, noise masks
    assert set(threads_at_eval + threads_at_upscale) == {1}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sam_mlx loads OpenBLAS on Linux only")
def test_single_threaded_blas_restores_the_thread_count(monkeypatch):
    library = _blas._library
    assert library is not None, "no system OpenBLAS loaded (install libopenblas0-pthread)"
    before = library.openblas_get_num_threads()
    library.openblas_set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with _blas.single_threaded():
                assert library.openblas_get_num_threads() == 1
                raise RuntimeError("inside")
        assert library.openblas_get_num_threads() == 2
        first, second = _blas.single_threaded(), _blas.single_threaded()  # overlapping, as from two threads
        first.__enter__()
        second.__enter__()
        first.__exit__(None, None, None)
        assert library.openblas_get_num_threads() == 1  # the second block is still open
        second.__exit__(None, None, None)
        assert library.openblas_get_num_threads() == 2
        monkeypatch.setattr(token_bands, "band_count", lambda: 1)  # one band: BLAS keeps its threads
        with token_bands.parallel_bands():
            assert library.openblas_get_num_threads() == 2
        monkeypatch.setattr(token_bands, "band_count", lambda: 2)
        with token_bands.parallel_bands():
            assert library.openblas_get_num_threads() == 1
    finally:
        library.openblas_set_num_threads(before)
