"""Model configurations, serialisable to the JSON stored in safetensors metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


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
        per_stage = (self.embed_dims, self.depths, self.num_heads, self.window_sizes)
        # The strides (4, 2, 2, 1) give MobileSAM's stride-16 output only with four stages.
        if any(len(t) != 4 for t in per_stage):
            raise ValueError(f"TinyViTConfig needs 4 stages, got {[len(t) for t in per_stage]}")

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder_kind": self.encoder.kind,
            "encoder": asdict(self.encoder),
            "decoder": asdict(self.decoder),
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamConfig:
        kind = data.get("encoder_kind")
        if kind not in ENCODER_CONFIGS:
            raise ValueError(f"unknown image encoder kind {kind!r}; expected one of {sorted(ENCODER_CONFIGS)}")
        return cls(
            encoder=ENCODER_CONFIGS[kind].from_dict(data["encoder"]),
            decoder=PromptDecoderConfig.from_dict(data["decoder"]),
            image_size=int(data.get("image_size", 1024)),
        )

    @property
    def name(self) -> str:
        """A short human name: vit_b / vit_l / vit_h / vit_custom / tiny_vit."""
        enc = self.encoder
        if not isinstance(enc, ViTConfig):
            return enc.kind
        known = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
        return known.get((enc.embed_dim, enc.depth), "vit_custom")


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**values)
