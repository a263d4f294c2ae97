"""MobileSAM's TinyViT encoder weights (PyTorch names, BatchNorms) -> sam_mlx's ``TinyViTImageEncoder``."""

from __future__ import annotations

import math
from collections.abc import Mapping

import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..config import TinyViTConfig
from ..modeling.tiny_vit import TinyViTImageEncoder
from .errors import CheckpointError, checked, checked_shape
from .names import NameTable

_BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default, as in the original

# TinyViT's module names -> sam_mlx's (a conv with a BatchNorm is TinyViT's ``<name>.c`` and ``<name>.bn``).
TINY_VIT_NAMES = NameTable([
    ("patch_embed.seq.0.{rest}", "patch_embedding.conv1.{rest}"),
    ("patch_embed.seq.2.{rest}", "patch_embedding.conv2.{rest}"),  # seq.1 is the weightless GELU
    ("layers.{i}.blocks.{rest}", "stages.{i}.blocks.{rest}"),
    ("layers.{i}.downsample.{rest}", "stages.{i}.patch_merging.{rest}"),
    ("neck.0.{rest}", "channel_projection.conv1.{rest}"),
    ("neck.1.{rest}", "channel_projection.norm1.{rest}"),
    ("neck.2.{rest}", "channel_projection.conv2.{rest}"),
    ("neck.3.{rest}", "channel_projection.norm2.{rest}"),
])


def _count(state: Mapping[str, np.ndarray], pattern: str) -> int:
    """Number of consecutive indices n (from 0) for which some key starts with ``pattern.format(n)``."""
    n = 0
    while any(k.startswith(pattern.format(n)) for k in state):
        n += 1
    return n


def infer_tiny_vit_config(state: Mapping[str, np.ndarray], prefix: str = "") -> TinyViTConfig:
    """Read a TinyViTConfig off torch-format encoder weights, whose keys start with ``prefix``.

    Raises CheckpointError naming a missing or mis-shaped key.
    """

    def shape(key: str, ndim: int, expected: str) -> tuple[int, ...]:
        return checked_shape(state, prefix + key, ndim, expected)

    stages = _count(state, prefix + "layers.{}.")
    depths = tuple(_count(state, f"{prefix}layers.{i}.blocks.{{}}.") for i in range(stages))
    conv1 = shape("layers.0.blocks.0.conv1.c.weight", 4, "hidden x dim x 1 x 1")
    dims, heads, windows = [conv1[1]], [TinyViTConfig.num_heads[0]], [TinyViTConfig.window_sizes[0]]
    for i in range(1, stages):
        dims.append(shape(f"layers.{i}.blocks.0.attn.norm.weight", 1, "dim")[0])
        key = f"layers.{i}.blocks.0.attn.attention_biases"
        table = shape(key, 2, "heads x window^2")
        window = math.isqrt(table[1])
        if window * window != table[1]:
            raise CheckpointError(f"{prefix}{key} has shape {table}, expected heads x window^2")
        heads.append(table[0])
        windows.append(window)
    return TinyViTConfig(
        embed_dims=tuple(dims),
        depths=depths,
        num_heads=tuple(heads),
        window_sizes=tuple(windows),
        mlp_ratio=shape("layers.1.blocks.0.mlp.fc1.weight", 2, "hidden x dim")[0] / dims[1],
        out_chans=shape("neck.0.weight", 4, "out_chans x dim x 1 x 1")[0],
        mbconv_expand_ratio=conv1[0] / dims[0],
        local_conv_size=shape("layers.1.blocks.0.local_conv.c.weight", 4, "dim x 1 x k x k")[-1],
    )


def _read(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``state[key]`` (``errors.checked``: of ``shape``, floats) read as float64."""
    return np.asarray(checked(state, key, shape), dtype=np.float64)


def _torch_name(name: str) -> str:
    theirs, values = TINY_VIT_NAMES.theirs(name)
    return theirs.format(**values)


def convert_tiny_vit_weights(state: Mapping[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """Torch-format encoder weights (keys starting with ``prefix``) -> float32 parameters of TinyViTImageEncoder.

    Conv weights go from O x I x kh x kw to O x kh x kw x I. Each eval-mode BatchNorm
    (``X.bn.*``) is folded into its conv ``X.c.weight``: w * g / sqrt(var + eps) and bias
    b - mean * g / sqrt(var + eps). The classification head, ``num_batches_tracked`` and
    ``attention_bias_idxs`` are not used. Raises CheckpointError naming a missing or mis-shaped key.
    """
    model = TinyViTImageEncoder(infer_tiny_vit_config(state, prefix))
    out: dict[str, np.ndarray] = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or path.startswith("channel_projection."):
            continue  # the trunk's convs had a BatchNorm each; the channel projection's did not
        torch_path = prefix + _torch_name(path + ".weight").removesuffix(".weight")
        o, kh, kw, i = module.weight.shape
        weight = _read(state, f"{torch_path}.c.weight", (o, i, kh, kw)).transpose(0, 2, 3, 1)
        bn = ("weight", "bias", "running_mean", "running_var")
        gamma, beta, mean, var = (_read(state, f"{torch_path}.bn.{n}", (o,)) for n in bn)
        scale = gamma / np.sqrt(var + _BN_EPS)
        out[f"{path}.weight"] = (weight * scale[:, None, None, None]).astype(np.float32)
        out[f"{path}.bias"] = (beta - mean * scale).astype(np.float32)
    for name, param in tree_flatten(model.parameters()):
        if name in out:
            continue
        torch_shape = (param.shape[0], param.shape[3], *param.shape[1:3]) if param.ndim == 4 else param.shape
        value = _read(state, prefix + _torch_name(name), torch_shape)
        out[name] = (value.transpose(0, 2, 3, 1) if value.ndim == 4 else value).astype(np.float32)
    return out
