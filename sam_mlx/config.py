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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ViTConfig":
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
    def from_dict(cls, data: dict[str, Any]) -> "PromptDecoderConfig":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class SamConfig:
    """Everything needed to build a SAM model; ``encoder`` is a ViTConfig or a TinyViTConfig."""

    encoder: Any = field(default_factory=ViTConfig)
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
    def from_dict(cls, data: dict[str, Any]) -> "SamConfig":
        from .modeling.tiny_vit import TinyViTConfig

        kinds = {"vit": ViTConfig, "tiny_vit": TinyViTConfig}
        kind = data.get("encoder_kind")
        if kind not in kinds:
            raise ValueError(f"unknown image encoder kind {kind!r}; expected one of {sorted(kinds)}")
        return cls(
            encoder=kinds[kind].from_dict(data["encoder"]),
            decoder=PromptDecoderConfig.from_dict(data["decoder"]),
            image_size=int(data.get("image_size", 1024)),
        )

    @property
    def name(self) -> str:
        """A short human name: vit_b / vit_l / vit_h / vit_custom / tiny_vit."""
        enc = self.encoder
        if enc.kind != "vit":
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
