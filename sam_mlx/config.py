"""Model configurations, serialisable to the JSON stored in safetensors metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Widths, depths and sizes far beyond any SAM (ViT-H: 1280 wide, 32 blocks): a config outside them is
# a damaged or crafted file, refused before a model is built (``check_fields``).
_LARGEST = 1 << 16
_LARGEST_IMAGE = 16384
QUANTIZATION_BITS = (None, 8, 4)  # weight-only quantization of the image encoder (``checkpoints.quantize``)


@dataclass(frozen=True)
class ViTConfig:
    """The SAM ViT image encoder (ViTDet backbone). Defaults are ViT-B."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attention_blocks: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    pretrain_grid: int = 64  # the grid the position encoding was trained at (1024 / 16)
    mlp_dim: int = 3072
    out_chans: int = 256
    qkv_bias: bool = True
    use_rel_pos: bool = True

    kind = "vit"

    def __post_init__(self) -> None:
        check_fields(self, may_be_zero=("window_size", "global_attention_blocks"))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"ViTConfig.num_heads ({self.num_heads}) must divide embed_dim ({self.embed_dim})")
        if any(i >= self.depth for i in self.global_attention_blocks):
            raise ValueError(f"ViTConfig.global_attention_blocks {self.global_attention_blocks} must be blocks "
                             f"0..{self.depth - 1}")

    @property
    def stages(self) -> tuple[tuple[int, ...], ...]:
        """The blocks of each stage: windowed-attention blocks closed by a global-attention one (4 stages in SAM);
        blocks after the last global one form a last stage."""
        stages, current = [], []
        for i in range(self.depth):
            current.append(i)
            if i in self.global_attention_blocks:
                stages.append(tuple(current))
                current = []
        return tuple(stages + [tuple(current)] if current else stages)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TinyViTConfig:
    """MobileSAM's TinyViT image encoder, one entry per stage. Defaults are TinyViT-5M.

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
    def from_dict(cls, data: dict[str, Any]) -> TinyViTConfig:
        return _from_dict(cls, data)


@dataclass(frozen=True)
class PromptDecoderConfig:
    """The prompt encoder and mask decoder, identical in every SAM v1 checkpoint."""

    embed_dim: int = 256
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        check_fields(self)
        if self.embed_dim % self.transformer_heads:
            raise ValueError(f"PromptDecoderConfig.transformer_heads ({self.transformer_heads}) must divide "
                             f"embed_dim ({self.embed_dim})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptDecoderConfig:
        return _from_dict(cls, data)


ENCODER_CONFIGS: dict[str, type[ViTConfig] | type[TinyViTConfig]] = {"vit": ViTConfig, "tiny_vit": TinyViTConfig}


@dataclass(frozen=True)
class SamConfig:
    """Everything needed to build a SAM model."""

    encoder: ViTConfig | TinyViTConfig = field(default_factory=ViTConfig)
    decoder: PromptDecoderConfig = field(default_factory=PromptDecoderConfig)
    image_size: int = 1024  # the square input the encoder was trained on
    hq: bool = False  # HQ-SAM: the mask decoder's HQ token and its fusion of the encoder's early features
    # bits of the image encoder's quantized Linear weights (``checkpoints.quantize``); None: not quantized
    encoder_bits: int | None = None

    def __post_init__(self) -> None:
        if type(self.hq) is not bool:
            raise ValueError(f"SamConfig.hq must be true or false, got {self.hq!r}")
        if self.encoder_bits not in QUANTIZATION_BITS:
            raise ValueError(f"SamConfig.encoder_bits must be one of {QUANTIZATION_BITS}, got {self.encoder_bits!r}")
        size = self.image_size
        if type(size) is not int or not 16 <= size <= _LARGEST_IMAGE or size % 16:
            raise ValueError(f"SamConfig.image_size must be a multiple of 16 from 16 to {_LARGEST_IMAGE}, got {size!r}")

    def to_dict(self) -> dict[str, Any]:
        data = {
            "encoder_kind": self.encoder.kind,
            "encoder": asdict(self.encoder),
            "decoder": asdict(self.decoder),
            "image_size": self.image_size,
        }
        # a plain, unquantized SAM's config (and fingerprint) as before HQ and quantization
        if self.encoder_bits is not None:
            data["encoder_bits"] = self.encoder_bits
        return {**data, "hq": True} if self.hq else data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a model config is a JSON object, got {type(data).__name__}")
        kind = data.get("encoder_kind")
        if kind not in ENCODER_CONFIGS:
            raise ValueError(f"unknown image encoder kind {kind!r}; expected one of {sorted(ENCODER_CONFIGS)}")
        return cls(
            encoder=ENCODER_CONFIGS[kind].from_dict(data.get("encoder")),
            decoder=PromptDecoderConfig.from_dict(data.get("decoder")),
            image_size=data.get("image_size", 1024),
            hq=data.get("hq", False),
            encoder_bits=data.get("encoder_bits"),
        )

    @property
    def name(self) -> str:
        """A short human name: vit_b / vit_l / vit_h / vit_custom / tiny_vit, with ``hq_`` before for HQ-SAM."""
        enc = self.encoder
        prefix = "hq_" if self.hq else ""
        if not isinstance(enc, ViTConfig):
            return prefix + enc.kind
        known = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
        return prefix + known.get((enc.embed_dim, enc.depth), "vit_custom")

    @property
    def early_feature_dim(self) -> int:
        """The channels of the encoder's early features HQ-SAM fuses: the ViT's width after its first
        global-attention block, TinyViT's after its second stage."""
        enc = self.encoder
        return enc.embed_dim if isinstance(enc, ViTConfig) else enc.embed_dims[2]


def _from_dict(cls, data: dict[str, Any]):
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object of fields, got {data!r}")
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)


def check_fields(config: Any, may_be_zero: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first field of a config dataclass whose value has the wrong type or lies
    outside 1.._LARGEST (0.._LARGEST for ``may_be_zero``): a config read from a file may be tampered with."""
    for f in fields(config):
        value, least = getattr(config, f.name), 0 if f.name in may_be_zero else 1
        if f.type == "bool":
            ok, want = type(value) is bool, "true or false"
        elif f.type == "float":
            ok = type(value) in (int, float) and math.isfinite(value) and 0 < value <= _LARGEST
            want = f"a number above 0 and at most {_LARGEST}"
        elif f.type == "int":
            ok, want = type(value) is int and least <= value <= _LARGEST, f"a whole number from {least} to {_LARGEST}"
        elif f.type == "tuple[int, ...]":
            ok = isinstance(value, tuple) and all(type(v) is int and least <= v <= _LARGEST for v in value)
            want = f"a list of whole numbers from {least} to {_LARGEST}"
        else:
            continue
        if not ok:
            raise ValueError(f"{type(config).__name__}.{f.name} must be {want}, got {value!r}")
