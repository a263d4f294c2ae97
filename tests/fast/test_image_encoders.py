"""The fast image encoders in row bands (their attention chunks spread over the bands' streams) equal one band."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import sam_mlx
from helpers import MOBILE_SAM
from sam_mlx.config import ViTConfig
from sam_mlx.fast.image_encoder import encode_vit
from sam_mlx.fast.tiny_vit import encode_tiny_vit
from sam_mlx.modeling.image_encoder import ImageEncoderViT
from sam_mlx.ops import attention, bands

RNG = np.random.default_rng(0)


def encode_in_bands(monkeypatch, encode, count: int) -> np.ndarray:
    monkeypatch.setattr(bands, "band_count", lambda: count)
    with bands.parallel_bands():
        return np.array(encode())


@pytest.mark.parametrize("count", [2, 3])
def test_vit_in_bands_equals_one_band(monkeypatch, count):
    """Windowed blocks (windows padded after the norm) and a global one, on a 7 x 5 grid; and the plain encoder."""
    monkeypatch.setattr(attention, "_CHUNK_LOGITS", 64)  # several chunks to spread
    config = ViTConfig(embed_dim=32, depth=2, num_heads=2, global_attention_blocks=(1,), mlp_dim=64, window_size=3)
    vit = ImageEncoderViT(config)
    params = vit.parameters()
    mx.eval(params)
    vit.update(nn.utils.tree_map(lambda p: mx.array(RNG.normal(size=p.shape).astype(np.float32) * 0.2), params))
    image = mx.array(RNG.normal(size=(1, 7 * 16, 5 * 16, 3)).astype(np.float32))
    one = encode_in_bands(monkeypatch, lambda: encode_vit(vit, image), 1)
    np.testing.assert_allclose(encode_in_bands(monkeypatch, lambda: encode_vit(vit, image), count), one, atol=1e-5)
    np.testing.assert_allclose(one, np.array(vit(image)), atol=1e-5)


def test_tiny_vit_in_bands_equals_one_band(monkeypatch):
    """MobileSAM's TinyViT with its per-token work in 3 row bands."""
    encoder = sam_mlx.load(str(MOBILE_SAM)).image_encoder
    image = mx.array(RNG.normal(size=(1, 160, 224, 3)).astype(np.float32))
    one = encode_in_bands(monkeypatch, lambda: encode_tiny_vit(encoder, image), 1)
    np.testing.assert_allclose(encode_in_bands(monkeypatch, lambda: encode_tiny_vit(encoder, image), 3), one, atol=1e-4)
