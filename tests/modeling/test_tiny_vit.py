"""MobileSAM's TinyViT encoder in MLX against the original PyTorch outputs in ../shared.

The reference ``image_embedding`` of each shared image is what MobileSAM's PyTorch
encoder (fp32) produced; the fast encoder (what the predictor runs) must match it to 1e-3
absolute (values are ~0.1 std) on every photo, and the plain reference encoder on one (it is
~7x slower on the CPU; ``tests/fast`` checks the two equal). At 1024 x 1024 the token grids
(128, 64) are not multiples of the windows (7, 14), so the parity tests also cover TinyViT's
window padding.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, REFERENCE
from sam_mlx.fast.tiny_vit import encode_tiny_vit
from sam_mlx.modeling.tiny_vit import TinyViTImageEncoder

PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)


def preprocess(path: Path, size: int = 1024) -> np.ndarray:
    """SAM's preprocessing: longest side to ``size`` (PIL bilinear), normalize, zero-pad.

    Returns 1 x size x size x 3 float32 (channels-last).
    """
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = size / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    pixels = np.asarray(image.resize((new_w, new_h), Image.BILINEAR), np.float32)
    out = np.zeros((size, size, 3), np.float32)
    out[:new_h, :new_w] = (pixels - PIXEL_MEAN) / PIXEL_STD
    return out[None]


@pytest.fixture(scope="module")
def encoder() -> TinyViTImageEncoder:
    return sam_mlx.load(str(MOBILE_SAM)).image_encoder


def assert_matches_reference(tokens: mx.array, name: str) -> None:
    reference = np.load(REFERENCE / f"{name}.npz")["image_embedding"]
    got = np.array(tokens[0])
    assert got.shape == (64, 64, 256)
    err = np.abs(got - reference.transpose(1, 2, 0)).max()
    assert err <= 1e-3, f"{name}: max abs error {err:.2e}"


@pytest.mark.parametrize("name", ["truck", "dog", "groceries"])
def test_fast_encoder_matches_pytorch_reference(encoder: TinyViTImageEncoder, name: str) -> None:
    assert_matches_reference(encode_tiny_vit(encoder, mx.array(preprocess(IMAGES / f"{name}.jpg"))), name)


def test_plain_encoder_matches_pytorch_reference(encoder: TinyViTImageEncoder) -> None:
    assert_matches_reference(encoder(mx.array(preprocess(IMAGES / "truck.jpg"))), "truck")


def test_non_square_input(encoder: TinyViTImageEncoder) -> None:
    """1024 x 688 (688 = 43 * 16): grids of 43 tokens pad to whole 7- and 14-windows."""
    x = mx.random.normal((1, 1024, 688, 3), key=mx.random.key(0))
    out = encode_tiny_vit(encoder, x)
    assert out.shape == (1, 64, 43, 256)
    assert bool(mx.all(mx.isfinite(out)))


def test_rejects_size_not_multiple_of_16(encoder: TinyViTImageEncoder) -> None:
    for encode in (encoder, lambda x: encode_tiny_vit(encoder, x)):
        with pytest.raises(ValueError, match="multiples of 16"):
            encode(mx.zeros((1, 1000, 1024, 3)))
