"""MobileSAM's image encoder: TinyViT-5M, turning an image into 256-channel tokens at stride 16.

Pipeline (channels-last throughout; strides for the standard 1024 x 1024 input):
  image B x H x W x 3
  --patch embedding (two 3x3 stride-2 convs, GELU between)-->       B x H/4 x W/4 x 64
  --stage 0: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project)--> same grid
  --patch merging (1x1, 3x3 depthwise stride 2, 1x1)-->              B x H/8 x W/8 x 128
  --stage 1: TinyViT blocks, 7 x 7 windows, then merging (stride 2)--> B x H/16 x W/16 x 160
  --stage 2: TinyViT blocks, 14 x 14 windows, then merging (stride 1: MobileSAM keeps the
    64 x 64 grid here, where the classification TinyViT would downsample again)--> 320 ch
  --stage 3: TinyViT blocks, 7 x 7 windows
  --neck (1x1 conv, LN, 3x3 conv, LN)-->                            B x H/16 x W/16 x 256

A TinyViT block is: windowed attention (pre-LayerNorm, learned per-offset bias) + residual,
3x3 depthwise conv, MLP (pre-LayerNorm) + residual. Every conv of the trunk is followed by
a BatchNorm; the converter folds those into the conv's weight and bias.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .attention import attention
from .checkpoint import CheckpointError, checked_shape, require_float
from .config import _from_dict, check_fields
from .layers import LayerNorm, gelu, layer_norm_2d
from .mlx_threads import compiled
from .token_bands import across_rows

_BN_EPS = 1e-5  # torch.nn.BatchNorm2d default, as in the original
_LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by the attention and MLP norms


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT hyper-parameters, one entry per stage. Defaults are MobileSAM's TinyViT-5M.

    Stage 0 is convolutional (MBConv), so ``num_heads[0]`` and ``window_sizes[0]`` are
    unused placeholders that keep the tuples aligned with the stages.
    """

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    out_chans: int = 256
    mbconv_expand_ratio: float = 4.0  # hidden width of the stage-0 MBConv blocks
    local_conv_size: int = 3  # kernel of the depthwise conv between attention and MLP

    kind = "tiny_vit"

    def __post_init__(self) -> None:
        check_fields(self)
        per_stage = (self.embed_dims, self.depths, self.num_heads, self.window_sizes)
        # The strides (4, 2, 2, 1) give MobileSAM's stride-16 output only with four stages.
        if any(len(t) != 4 for t in per_stage):
            raise ValueError(f"TinyViTConfig needs 4 stages, got {[len(t) for t in per_stage]}")
        for i in range(1, 4):
            if self.embed_dims[i] % self.num_heads[i]:
                raise ValueError(f"TinyViTConfig.num_heads[{i}] ({self.num_heads[i]}) must divide embed_dims[{i}] "
                                 f"({self.embed_dims[i]})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TinyViTConfig":
        return _from_dict(cls, data)


class ConvBN(nn.Module):
    """A conv whose BatchNorm was folded into ``weight`` (O x k x k x I, or O x k x k x 1 when
    depthwise) and ``bias`` (O). Depthwise convs run as k*k shifted multiply-adds, up to
    several times faster than MLX's grouped conv on CPU.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, depthwise: bool = False):
        super().__init__()
        self.stride, self.depthwise = stride, depthwise
        self.weight = mx.zeros((out_chans, kernel, kernel, 1 if depthwise else in_chans))
        self.bias = mx.zeros((out_chans,))

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x I -> B x H' x W' x O (padding k // 2, so H' = ceil(H / stride))."""
        o, k, _, i = self.weight.shape
        if self.depthwise:
            return _depthwise_conv(x, self.weight, self.bias, self.stride)
        if k == 1 and self.stride == 1:  # a matmul: several times faster than MLX's 1x1 conv on CPU
            return x @ self.weight.reshape(o, i).T + self.bias
        return mx.conv2d(x, self.weight, stride=self.stride, padding=k // 2) + self.bias


@compiled
def _depthwise_conv(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """B x H x W x C (*) C x k x k x 1 depthwise conv, padding k // 2, as k*k fused shifted multiply-adds."""
    k, s = weight.shape[1], stride
    h, w = (x.shape[1] - 1) // s + 1, (x.shape[2] - 1) // s + 1
    p = k // 2
    x = mx.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    out = bias
    for i in range(k):
        for j in range(k):
            out = out + x[:, i : i + s * (h - 1) + 1 : s, j : j + s * (w - 1) + 1 : s] * weight[:, i, j, 0]
    return out


class PatchEmbed(nn.Module):
    """Two 3x3 stride-2 convs with a GELU between: B x H x W x 3 -> B x H/4 x W/4 x dim."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = ConvBN(3, dim // 2, 3, stride=2)
        self.conv2 = ConvBN(dim // 2, dim, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv2(gelu(self.conv1(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, GELU, 3x3 depthwise, GELU, 1x1 project, + input, GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, depthwise=True)
        self.conv3 = ConvBN(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x C -> same shape; the 1x1 convs run in row bands (``token_bands``)."""
        hidden = self.conv2(across_rows(lambda t: gelu(self.conv1(t)), x))
        return across_rows(lambda t, h: gelu(t + self.conv3(gelu(h))), x, hidden)


class PatchMerging(nn.Module):
    """1x1 conv, GELU, 3x3 depthwise conv with ``stride``, GELU, 1x1 conv.

    B x H x W x I -> B x H/s x W/s x O (stride 2, or 1 for MobileSAM's last merging).
    """

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, depthwise=True)
        self.conv3 = ConvBN(out_dim, out_dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv3(gelu(self.conv2(gelu(self.conv1(x)))))


@lru_cache(maxsize=16)
def attention_bias_index(window: int) -> np.ndarray:
    """N x N (N = window^2) index into a per-head bias table of ``window^2`` offsets.

    Tokens i, j at (yi, xi), (yj, xj) of the window share the learned bias of the offset
    (|yi - yj|, |xi - xj|), stored at ``|dy| * window + |dx|`` (TinyViT's first-seen order).
    """
    y, x = np.divmod(np.arange(window * window), window)
    return np.abs(y[:, None] - y[None, :]) * window + np.abs(x[:, None] - x[None, :])


class WindowAttention(nn.Module):
    """LayerNorm + multi-head self-attention inside each window, with a learned bias per offset.

    ``qkv`` is laid out per head as [q, k, v] (TinyViT's order), not as [q heads, k heads, v heads].
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.norm = LayerNorm(dim, eps=_LN_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = mx.zeros((num_heads, window * window))

    def __call__(self, x: mx.array) -> mx.array:
        """x: nWindows x window^2 x C -> same shape."""
        n, length, c = x.shape
        head_dim = c // self.num_heads
        qkv = across_rows(lambda t: self.qkv(self.norm(t)), x)
        qkv = qkv.reshape(n, length, self.num_heads, 3 * head_dim).transpose(0, 2, 1, 3)
        q, k, v = mx.split(qkv, 3, axis=-1)  # each nWindows x heads x window^2 x head_dim
        bias = self.attention_biases[:, mx.array(attention_bias_index(self.window))]  # heads x N x N
        out = attention(q, k, v, head_dim**-0.5, mask=bias, spread=True)
        return across_rows(self.proj, out.transpose(0, 2, 1, 3).reshape(n, length, c))


class TinyViTMLP(nn.Module):
    """LayerNorm, Linear, GELU, Linear (the norm is part of TinyViT's MLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = LayerNorm(dim, eps=_LN_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention + residual, depthwise conv, MLP + residual."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv_size, depthwise=True)
        self.mlp = TinyViTMLP(dim, int(dim * mlp_ratio))

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x C -> same shape, for any H, W.

        The grid is zero-padded bottom/right to whole windows *before* the attention's
        LayerNorm, as in TinyViT: padded tokens are not masked and take part as keys
        (with the LayerNorm's bias as their features), so windows keep their trained size.
        """
        b, h, w, c = x.shape
        ws = self.window
        pad_h, pad_w = -h % ws, -w % ws
        y = mx.pad(x, [(0, 0), (0, pad_h), (0, pad_w), (0, 0)]) if pad_h or pad_w else x
        nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
        y = y.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        y = self.attn(y).reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
        x = x + y.reshape(b, nh * ws, nw * ws, c)[:, :h, :w]
        x = self.local_conv(x)
        return across_rows(lambda t: t + self.mlp(t), x)


class TinyViTStage(nn.Module):
    """A stage's blocks (MBConv in stage 0, TinyViT blocks after) and its optional patch merging."""

    def __init__(self, config: TinyViTConfig, index: int):
        super().__init__()
        dim = config.embed_dims[index]
        if index == 0:
            hidden = int(dim * config.mbconv_expand_ratio)
            self.blocks = [MBConv(dim, hidden) for _ in range(config.depths[0])]
        else:
            heads, window = config.num_heads[index], config.window_sizes[index]
            self.blocks = [
                TinyViTBlock(dim, heads, window, config.mlp_ratio, config.local_conv_size)
                for _ in range(config.depths[index])
            ]
        last = len(config.depths) - 1
        if index < last:  # MobileSAM's last merging keeps the resolution (stride 1)
            stride = 1 if index == last - 1 else 2
            self.downsample = PatchMerging(dim, config.embed_dims[index + 1], stride)

    def __call__(self, x: mx.array) -> mx.array:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if "downsample" in self else x


class TinyViTImageEncoder(nn.Module):
    """MobileSAM's TinyViT image encoder (parameter names follow the PyTorch ones, minus BatchNorms)."""

    def __init__(self, config: TinyViTConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.embed_dims[0])
        self.layers = [TinyViTStage(config, i) for i in range(len(config.depths))]
        out = config.out_chans
        self.neck = [
            nn.Conv2d(config.embed_dims[-1], out, kernel_size=1, bias=False),
            layer_norm_2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            layer_norm_2d(out),
        ]

    def __call__(self, x: mx.array) -> mx.array:
        """x: B x H x W x 3 normalized image, H and W multiples of 16 (1024 x 1024 normally).

        Returns B x H/16 x W/16 x out_chans image tokens.
        """
        if x.ndim != 4 or x.shape[1] % 16 or x.shape[2] % 16 or x.shape[3] != 3:
            raise ValueError(f"expected B x H x W x 3 with H, W multiples of 16, got {x.shape}")
        for module in [self.patch_embed, *self.layers, *self.neck]:
            x = module(x)
        return x


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


def _checked(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``state[key]`` as float64, which must have exactly ``shape``."""
    expected = tuple(shape)
    found = checked_shape(state, key, len(expected), str(expected))
    if found != expected:
        raise CheckpointError(f"{key} has shape {found}, expected {expected}")
    require_float(state[key], key)
    return np.asarray(state[key], dtype=np.float64)


# The only MLX module paths that differ from the PyTorch ones (seq.1 is the weightless GELU).
_TORCH_CONV_PATHS = {"patch_embed.conv1": "patch_embed.seq.0", "patch_embed.conv2": "patch_embed.seq.2"}


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
        if not isinstance(module, ConvBN):
            continue
        torch_path = prefix + _TORCH_CONV_PATHS.get(path, path)
        o, kh, kw, i = module.weight.shape
        weight = _checked(state, f"{torch_path}.c.weight", (o, i, kh, kw)).transpose(0, 2, 3, 1)
        bn = ("weight", "bias", "running_mean", "running_var")
        gamma, beta, mean, var = (_checked(state, f"{torch_path}.bn.{n}", (o,)) for n in bn)
        scale = gamma / np.sqrt(var + _BN_EPS)
        out[f"{path}.weight"] = (weight * scale[:, None, None, None]).astype(np.float32)
        out[f"{path}.bias"] = (beta - mean * scale).astype(np.float32)
    for name, param in tree_flatten(model.parameters()):
        if name in out:
            continue
        torch_shape = (param.shape[0], param.shape[3], *param.shape[1:3]) if param.ndim == 4 else param.shape
        value = _checked(state, prefix + name, torch_shape)
        out[name] = (value.transpose(0, 2, 3, 1) if value.ndim == 4 else value).astype(np.float32)
    return out
