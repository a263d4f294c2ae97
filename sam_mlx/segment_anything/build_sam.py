"""``segment_anything.build_sam`` on sam_mlx: ``sam_model_registry[name](checkpoint=PATH)`` and the
``build_sam_vit_*`` functions, returning ``modeling.Sam``. "vit_t" is MobileSAM's TinyViT, as MobileSAM's fork
names it. The checkpoint may be anything ``sam_mlx.load`` reads (Meta's .pth, transformers' or sam_mlx's
safetensors); one of another model than the name says is refused, as the original refuses it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..checkpoints.errors import CheckpointError
from ..config import SamConfig, TinyViTConfig, ViTConfig
from .modeling import Sam

ENCODERS: dict[str, ViTConfig | TinyViTConfig] = {
    "vit_h": ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attention_blocks=(7, 15, 23, 31), mlp_dim=5120),
    "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attention_blocks=(5, 11, 17, 23), mlp_dim=4096),
    "vit_b": ViTConfig(),
    "vit_t": TinyViTConfig(),
}
_CONFIG_NAMES = {"vit_h": "vit_h", "vit_l": "vit_l", "vit_b": "vit_b", "vit_t": "tiny_vit"}


def _build(name: str, checkpoint: str | Path | None) -> Sam:
    """The ``name`` model with the checkpoint's weights; without a checkpoint, untrained (as the original)."""
    if checkpoint is None:
        return Sam(SamConfig(encoder=ENCODERS[name])).eval()
    from .. import load

    model = load(str(checkpoint))
    if model.config.name != _CONFIG_NAMES[name]:
        wanted = next((key for key, value in _CONFIG_NAMES.items() if value == model.config.name), None)
        use = f"sam_model_registry[{wanted!r}]" if wanted else "sam_mlx.load(path) and sam_mlx's own API"
        raise CheckpointError(f"{checkpoint}: a {model.config.name} checkpoint, not {name}: use {use}")
    return Sam.from_model(model)


def build_sam_vit_h(checkpoint: str | Path | None = None) -> Sam:
    return _build("vit_h", checkpoint)


def build_sam_vit_l(checkpoint: str | Path | None = None) -> Sam:
    return _build("vit_l", checkpoint)


def build_sam_vit_b(checkpoint: str | Path | None = None) -> Sam:
    return _build("vit_b", checkpoint)


def build_sam_vit_t(checkpoint: str | Path | None = None) -> Sam:
    """MobileSAM (TinyViT-5M image encoder)."""
    return _build("vit_t", checkpoint)


build_sam = build_sam_vit_h

sam_model_registry: dict[str, Callable[..., Sam]] = {
    "default": build_sam_vit_h,
    "vit_h": build_sam_vit_h,
    "vit_l": build_sam_vit_l,
    "vit_b": build_sam_vit_b,
    "vit_t": build_sam_vit_t,
}
