"""MobileSAM's TinyViT weights (PyTorch names, BatchNorms) -> sam_mlx's TinyViT encoder."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers import MOBILE_SAM
from sam_mlx.checkpoints.tiny_vit import convert_tiny_vit_weights, infer_tiny_vit_config
from sam_mlx.config import TinyViTConfig


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    """The checkpoint's image_encoder.* weights as numpy, prefix removed."""
    checkpoint = torch.load(MOBILE_SAM, map_location="cpu")
    prefix = "image_encoder."
    return {k[len(prefix) :]: v.numpy() for k, v in checkpoint.items() if k.startswith(prefix)}


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
    assert weights["patch_embedding.conv1.weight"].shape == (32, 3, 3, 3)  # O x kh x kw x I
    assert weights["stages.0.blocks.0.conv2.weight"].shape == (256, 3, 3, 1)  # depthwise
    assert weights["stages.2.patch_merging.conv2.bias"].shape == (320,)
    assert weights["channel_projection.conv2.weight"].shape == (256, 3, 3, 256)
    assert all(v.dtype == np.float32 for v in weights.values())
