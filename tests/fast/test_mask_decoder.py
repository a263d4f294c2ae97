"""The fast mask decoder's parts against the plain modules (and attention against float64): reassociated
attention, the kept per-image side and its low-rank shift by a mask hint, row bands, prompt groups, the
tokens read."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from sam_mlx.config import PromptDecoderConfig
from sam_mlx.fast.mask_decoder import decode, image_side, mask_hint
from sam_mlx.fast.two_way_transformer import (
    attend,
    attend_to_bands,
    attend_to_projected_bands,
    attend_with_projected_queries,
    two_way_transformer,
)
from sam_mlx.modeling.mask_decoder import MaskDecoder
from sam_mlx.modeling.two_way_transformer import Attention
from sam_mlx.ops import bands

RNG = np.random.default_rng(0)


def _attention64(q, k, v, scale):
    logits = q.astype(np.float64) @ np.swapaxes(k, -1, -2) * scale
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ v


def _reference_attention(layer: Attention, q, k, v) -> np.ndarray:
    """Project, split heads, attend, merge, project: the textbook order, in float64."""
    def linear(x, lin):
        return x.astype(np.float64) @ np.array(lin.weight, np.float64).T + np.array(lin.bias, np.float64)

    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], layer.num_heads, -1).transpose(0, 2, 1, 3)

    qh, kh, vh = heads(linear(q, layer.q_proj)), heads(linear(k, layer.k_proj)), heads(linear(v, layer.v_proj))
    out = _attention64(qh, kh, vh, qh.shape[-1] ** -0.5)
    b, h, n, c = out.shape
    return linear(out.transpose(0, 2, 1, 3).reshape(b, n, h * c), layer.out_proj)


def _random_biases(layer: Attention) -> Attention:
    for lin in (layer.q_proj, layer.k_proj, layer.v_proj, layer.out_proj):
        lin.bias = mx.array(RNG.normal(size=lin.bias.shape).astype(np.float32))
    return layer


def _bands(x: np.ndarray, count: int) -> list[mx.array]:
    """B x N x D tokens cut into ``count`` bands of consecutive tokens."""
    return [mx.array(part) for part in np.array_split(x, count, axis=1)]


@pytest.mark.parametrize("nq,nk", [(300, 7), (12, 12), (300, 40)])  # few keys, neither, too many keys for the shortcut
def test_attention_paths(nq, nk):
    layer = _random_biases(Attention(64, num_heads=4, downsample_rate=2))
    q = RNG.normal(size=(2, nq, 64)).astype(np.float32)
    k = RNG.normal(size=(2, nk, 64)).astype(np.float32)
    v = RNG.normal(size=(2, nk, 64)).astype(np.float32)
    expected = _reference_attention(layer, q, k, v)
    np.testing.assert_allclose(np.array(attend(layer, mx.array(q), mx.array(k), mx.array(v))), expected, atol=2e-5)
    np.testing.assert_allclose(np.array(layer(mx.array(q), mx.array(k), mx.array(v))), expected, atol=2e-5)  # plain


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("nq", [7, 20])  # the key-space product, projected keys (4 heads x 20 > 32 wide)
def test_attention_to_banded_keys(nq, count):
    """Few queries over keys cut in bands, each band on its own stream, equal attention over all keys."""
    layer = _random_biases(Attention(64, num_heads=4, downsample_rate=2))
    q = RNG.normal(size=(2, nq, 64)).astype(np.float32)
    k = RNG.normal(size=(2, 300, 64)).astype(np.float32)
    v = RNG.normal(size=(2, 300, 64)).astype(np.float32)
    got = np.array(attend_to_bands(layer, mx.array(q), _bands(k, count), _bands(v, count)))
    np.testing.assert_allclose(got, _reference_attention(layer, q, k, v), atol=2e-5)


@pytest.mark.parametrize("count", [1, 2])
def test_attention_with_one_side_projected(count):
    """The per-image shortcuts: image-side projections made once (batch 1) serve a batch of prompts."""
    layer = _random_biases(Attention(64, num_heads=4, downsample_rate=2))
    image = RNG.normal(size=(1, 300, 64)).astype(np.float32)
    prompts = RNG.normal(size=(3, 7, 64)).astype(np.float32)
    images = np.broadcast_to(image, (3, 300, 64))
    x, p = _bands(image, count), mx.array(prompts)
    keys = [layer.split_heads(layer.k_proj(band)) for band in x]
    got = attend_to_projected_bands(layer, p, keys, [layer.split_heads(layer.v_proj(band)) for band in x])
    np.testing.assert_allclose(np.array(got), _reference_attention(layer, prompts, images, images), atol=2e-5)
    got = attend_with_projected_queries(layer, layer.split_heads(layer.q_proj(mx.array(image))), p, p)
    np.testing.assert_allclose(np.array(got), _reference_attention(layer, images, prompts, prompts), atol=2e-5)


def _random_decoder() -> MaskDecoder:
    decoder = MaskDecoder(PromptDecoderConfig())
    params = decoder.parameters()
    mx.eval(params)
    decoder.update(nn.utils.tree_map(lambda p: mx.array(RNG.normal(size=p.shape).astype(np.float32) * 0.05), params))
    hint_encoder = decoder.mask_hint_encoder  # hints that change the masks visibly
    hint_encoder.update(nn.utils.tree_map(lambda p: p * 6, hint_encoder.parameters()))
    return decoder


def _random_inputs(d: int, grid: tuple[int, int], prompts: int) -> tuple[mx.array, ...]:
    """Image tokens 1 x h x w x d, their position encoding h x w x d, prompt tokens B x 3 x d and mask hints
    B x 4h x 4w x 1, all random."""
    shapes = ((1, *grid, d), (*grid, d), (prompts, 3, d), (prompts, 4 * grid[0], 4 * grid[1], 1))
    return tuple(mx.array(RNG.normal(size=shape).astype(np.float32)) for shape in shapes)


def _assert_close(got: tuple[mx.array, ...], expected: tuple[mx.array, ...]) -> None:
    """Equal within float32 rounding, relative to the outputs' size (the random decoder's are ~0.004-0.1)."""
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.array(g), np.array(e), atol=1e-5 * float(e.abs().max()))


def test_kept_image_side_equals_the_plain_decoder():
    """Prompts without a mask hint, decoded from the image side projected once, equal the plain decoder."""
    decoder = _random_decoder()
    tokens, pe, prompts, _ = _random_inputs(decoder.iou_token.shape[-1], (8, 8), 6)
    side = image_side(decoder, tokens, pe)
    for multimask in (True, False):
        expected = decoder(tokens, pe, prompts, None, multimask)
        _assert_close(decode(decoder, side, pe, prompts, None, multimask), expected)


@pytest.mark.parametrize("outputs", [[0, 2, 3, 4], [0, 1], [6]])
def test_transformer_computes_only_the_tokens_read(outputs):
    """The final attention run only for the tokens the decoder reads gives those tokens' rows of the plain
    transformer (the IoU token with masks 1-3 or mask 0, or a prompt token), and the same image tokens."""
    transformer = _random_decoder().transformer
    d = transformer.norm_final_attn.weight.shape[0]
    image, pe, tokens, _ = _random_inputs(d, (6, 4), 2)
    tokens = mx.concatenate([tokens, tokens[:, ::-1] * 0.5, tokens[:, :1]], axis=1)  # 7 tokens
    image = mx.broadcast_to(image, (2, *image.shape[1:]))
    all_tokens, all_image = transformer(image, pe, tokens)
    image_bands, pe_bands = bands.row_bands(image, 2), bands.row_bands(pe[None], 2)
    read, read_image = two_way_transformer(transformer, image_bands, pe_bands, tokens, outputs=outputs)
    assert read.shape == (2, len(outputs), d)
    np.testing.assert_allclose(np.array(read), np.array(all_tokens[:, mx.array(outputs)]), atol=1e-5)
    np.testing.assert_allclose(np.concatenate([np.array(b) for b in read_image], axis=1), np.array(all_image),
                               atol=1e-5)


def test_prompt_groups_equal_one_at_a_time():
    """9 prompts with mask hints decoded together (in groups on the CPU) equal each decoded alone."""
    decoder = _random_decoder()
    tokens, pe, prompts, masks = _random_inputs(decoder.iou_token.shape[-1], (8, 8), 9)
    side, hint = image_side(decoder, tokens, pe), mask_hint(decoder, masks)
    all_masks, all_iou = decode(decoder, side, pe, prompts, hint, True)
    assert all_masks.shape == (9, 3, 32, 32) and all_iou.shape == (9, 3)
    for i in range(9):
        one = hint._replace(features=hint.features[i : i + 1])
        one_masks, one_iou = decode(decoder, side, pe, prompts[i : i + 1], one, True)
        _assert_close((all_masks[i], all_iou[i]), (one_masks[0], one_iou[0]))
    assert math.isfinite(float(all_masks.abs().max()))


@pytest.mark.parametrize("count", [2, 3, 5])
def test_bands_equal_one_band(monkeypatch, count):
    """The decoder with its image tokens cut in row bands, each on its own stream (uneven on a 7 x 5 grid),
    equals one band: with the kept image side, and with per-prompt mask hints."""
    decoder = _random_decoder()
    tokens, pe, prompts, masks = _random_inputs(decoder.iou_token.shape[-1], (7, 5), 4)

    def run(n: int) -> list[np.ndarray]:
        monkeypatch.setattr(bands, "band_count", lambda: n)
        with bands.parallel_bands():
            side = image_side(decoder, tokens, pe)
            assert len(side.image) == n and sum(b.shape[1] for b in side.image) == 7 * 5
            outputs = (*decode(decoder, side, pe, prompts, None, True),
                       *decode(decoder, side, pe, prompts, mask_hint(decoder, masks), False))
            return [np.array(o) for o in outputs]

    for got, expected in zip(run(count), run(1), strict=True):
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("read_grid", [None, (5, 4)])
def test_mask_hint_shifting_the_kept_image_side_equals_the_plain_decoder(monkeypatch, count, read_grid):
    """Prompts with mask hints, decoded from the per-image side shifted by each hint's rank-16 change
    (hint features in row bands, prompts in groups), equal the plain decoder's dense embedding of the hints."""
    monkeypatch.setattr(bands, "band_count", lambda: count)
    decoder = _random_decoder()
    d = decoder.iou_token.shape[-1]
    tokens, pe, prompts, masks = _random_inputs(d, (7, 5), 3)
    rows, cols = read_grid or (7, 5)
    with bands.parallel_bands():
        side = image_side(decoder, tokens, pe)
        hint = mask_hint(decoder, masks)
        rows_per_band = [7 * (i + 1) // count - 7 * i // count for i in range(count)]
        assert [b.shape for b in side.image] == [(1, rows * 5, d) for rows in rows_per_band]
        for multimask in (True, False):
            expected_masks, expected_iou = decoder(tokens, pe, prompts, masks, multimask)
            got = decode(decoder, side, pe, prompts, hint, multimask, read_grid)
            _assert_close(got, (expected_masks[..., : 4 * rows, : 4 * cols], expected_iou))
            no_hint = decoder(tokens, pe, prompts, None, multimask)[0]  # the hints change the masks
            assert float(mx.abs(expected_masks - no_hint).max()) > 0.01 * float(expected_masks.abs().max())
    # the hint's change is the dense embedding less "no mask", in factored form
    change = hint.features @ hint.weight + hint.offset
    dense = decoder.mask_hint_encoder(masks, (7, 5), 3)
    np.testing.assert_allclose(np.array(change + decoder.mask_hint_encoder.no_mask_embedding[0]), np.array(dense),
                               atol=1e-5 * float(dense.abs().max()))


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("read_grid", [(5, 4), (7, 3), (2, 5), (1, 1), (7, 5)])
def test_masks_of_the_tokens_read_equal_that_part_of_the_full_masks(monkeypatch, count, read_grid):
    """Masks of the top-left rows x cols tokens only (bands re-cut evenly over that part) equal that part
    of the full masks, with the same IoU predictions: with the kept image side, with hints, in prompt groups."""
    monkeypatch.setattr(bands, "band_count", lambda: count)
    decoder = _random_decoder()
    tokens, pe, prompts, masks = _random_inputs(decoder.iou_token.shape[-1], (7, 5), 3)
    rows, cols = read_grid
    with bands.parallel_bands():
        side = image_side(decoder, tokens, pe)
        for hint, multimask in ((None, True), (mask_hint(decoder, masks), False)):
            full, iou = decode(decoder, side, pe, prompts, hint, multimask)
            part, part_iou = decode(decoder, side, pe, prompts, hint, multimask, read_grid)
            assert part.shape == (3, full.shape[1], 4 * rows, 4 * cols)
            np.testing.assert_allclose(np.array(part), np.array(full[..., : 4 * rows, : 4 * cols]), atol=1e-5)
            np.testing.assert_array_equal(np.array(part_iou), np.array(iou))
