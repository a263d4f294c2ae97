"""MobileSAM's TinyViT encoder in MLX against the original PyTorch outputs in ../shared.

The reference ``image_embedding`` of each shared image is what MobileSAM's PyTorch
encoder (fp32) produced; our fp32 port must match it to 1e-3 absolute (values are ~0.1 std).
At 1024 x 1024 the token grids (128, 64) are not multiples of the windows (7, 14), so the
parity tests also cover TinyViT's window padding.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import IMAGES, MOBILE_SAM, REFERENCE
from PIL import Image

from sam_mlx.ops import bands as token_bands
from sam_mlx.modeling.tiny_vit import (
    TinyViTConfig,
    TinyViTImageEncoder,
    convert_tiny_vit_weights,
    infer_tiny_vit_config,
)

WEIGHTS = MOBILE_SAM
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
def state() -> dict[str, np.ndarray]:
    """The checkpoint's image_encoder.* weights as numpy, prefix removed."""
    checkpoint = torch.load(WEIGHTS, map_location="cpu")
    prefix = "image_encoder."
    return {k[len(prefix) :]: v.numpy() for k, v in checkpoint.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def encoder(state: dict[str, np.ndarray]) -> TinyViTImageEncoder:
    model = TinyViTImageEncoder(infer_tiny_vit_config(state))
    model.load_weights([(k, mx.array(v)) for k, v in convert_tiny_vit_weights(state).items()], strict=True)
    mx.eval(model.parameters())
    return model


def test_infer_config_gives_tiny_vit_5m(state: dict[str, np.ndarray]) -> None:
    assert infer_tiny_vit_config(state) == TinyViTConfig()


def test_config_from_dict() -> None:
    data = {"embed_dims": [64, 128, 160, 320], "window_sizes": [7, 7, 14, 7]}
    assert TinyViTConfig.from_dict(data) == TinyViTConfig()
    with pytest.raises(ValueError, match="bogus"):
        TinyViTConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize(
    "key, fault",
    [
        ("layers.2.blocks.3.attn.qkv.weight", "missing"),
        ("neck.2.weight", "missing"),
        ("layers.0.blocks.1.conv2.bn.running_var", "missing"),
        ("layers.1.blocks.1.mlp.fc1.weight", "shape"),
        ("layers.2.downsample.conv2.c.weight", "shape"),
        ("layers.3.blocks.0.attn.attention_biases", "shape"),
    ],
)
def test_convert_names_bad_key(state: dict[str, np.ndarray], key: str, fault: str) -> None:
    broken = dict(state)
    if fault == "missing":
        del broken[key]
    else:
        broken[key] = broken[key][..., :-1]
    with pytest.raises(ValueError, match=re.escape(key)):
        convert_tiny_vit_weights(broken)


def test_conversion_folds_batchnorm_and_drops_buffers(state: dict[str, np.ndarray]) -> None:
    weights = convert_tiny_vit_weights(state)
    assert not any(".bn." in k or "num_batches_tracked" in k or k.startswith("head.") for k in weights)
    assert weights["patch_embed.conv1.weight"].shape == (32, 3, 3, 3)  # O x kh x kw x I
    assert weights["layers.0.blocks.0.conv2.weight"].shape == (256, 3, 3, 1)  # depthwise
    assert all(v.dtype == np.float32 for v in weights.values())


@pytest.mark.parametrize("name", ["truck", "dog", "groceries"])
def test_matches_pytorch_reference(encoder: TinyViTImageEncoder, name: str) -> None:
    reference = np.load(REFERENCE / f"{name}.npz")["image_embedding"]
    out = encoder(mx.array(preprocess(IMAGES / f"{name}.jpg")))
    got = np.array(out[0])
    assert got.shape == (64, 64, 256)
    err = np.abs(got - reference.transpose(1, 2, 0)).max()
    assert err <= 1e-3, f"{name}: max abs error {err:.2e}"


def test_non_square_input(encoder: TinyViTImageEncoder) -> None:
    """1024 x 688 (688 = 43 * 16): grids of 43 tokens pad to whole 7- and 14-windows."""
    x = mx.random.normal((1, 1024, 688, 3), key=mx.random.key(0))
    out = encoder(x)
    assert out.shape == (1, 64, 43, 256)
    assert bool(mx.all(mx.isfinite(out)))


def test_rejects_size_not_multiple_of_16(encoder: TinyViTImageEncoder) -> None:
    with pytest.raises(ValueError, match="multiples of 16"):
        encoder(mx.zeros((1, 1000, 1024, 3)))


def test_bands_equal_one_band(encoder: TinyViTImageEncoder, monkeypatch):
    """The per-token work in 3 row bands and the window attention spread over their streams equal one band."""
    image = mx.array(np.random.default_rng(0).normal(size=(1, 160, 224, 3)).astype(np.float32))

    def encode(count: int) -> np.ndarray:
        monkeypatch.setattr(token_bands, "band_count", lambda: count)
        with token_bands.parallel_bands():
            return np.array(encoder(image))

    np.testing.assert_allclose(encode(3), encode(1), atol=1e-4)
