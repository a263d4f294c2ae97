"""Hugging Face transformers ``SamModel`` (and ``SamHQModel``) state dict -> Meta's (HQ-SAM's) original key names.

The arrays are unchanged: transformers keeps Meta's layouts (conv kernels OIHW, linear
weights out x in, relative position tables (2s-1) x head_dim, ``pos_embed`` 1 x g x g x D)
and stores the coordinate encoder's Gaussian matrix 2 x 128 exactly as Meta does (its
``scale`` only multiplies the random initialisation). Only names differ, plus:

- ``prompt_encoder.shared_embedding.positional_embedding`` is tied to
  ``shared_image_embedding.positional_embedding`` (``save_pretrained`` usually drops it):
  the latter is used and the former, if present, ignored;
- transformers' ``SamFeedForward`` names its linears ``proj_in``, ``layers.0..n-3``,
  ``proj_out`` where Meta's ``MLP`` has ``layers.0..n-1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from .errors import CheckpointError, few
from .names import NameTable

_TIED_PE = "prompt_encoder.shared_embedding.positional_embedding"

# transformers name -> Meta name. Each MLP's layers are renumbered after (``{mlp}``: proj_in, layers.i, proj_out).
HF_NAMES = NameTable([
    # image encoder
    ("vision_encoder.patch_embed.projection.{p}", "image_encoder.patch_embed.proj.{p}"),
    ("vision_encoder.pos_embed", "image_encoder.pos_embed"),
    ("vision_encoder.layers.{i}.layer_norm1.{p}", "image_encoder.blocks.{i}.norm1.{p}"),
    ("vision_encoder.layers.{i}.attn.qkv.{p}", "image_encoder.blocks.{i}.attn.qkv.{p}"),
    ("vision_encoder.layers.{i}.attn.proj.{p}", "image_encoder.blocks.{i}.attn.proj.{p}"),
    ("vision_encoder.layers.{i}.attn.rel_pos_h", "image_encoder.blocks.{i}.attn.rel_pos_h"),
    ("vision_encoder.layers.{i}.attn.rel_pos_w", "image_encoder.blocks.{i}.attn.rel_pos_w"),
    ("vision_encoder.layers.{i}.layer_norm2.{p}", "image_encoder.blocks.{i}.norm2.{p}"),
    ("vision_encoder.layers.{i}.mlp.lin1.{p}", "image_encoder.blocks.{i}.mlp.lin1.{p}"),
    ("vision_encoder.layers.{i}.mlp.lin2.{p}", "image_encoder.blocks.{i}.mlp.lin2.{p}"),
    ("vision_encoder.neck.conv1.weight", "image_encoder.neck.0.weight"),
    ("vision_encoder.neck.layer_norm1.{p}", "image_encoder.neck.1.{p}"),
    ("vision_encoder.neck.conv2.weight", "image_encoder.neck.2.weight"),
    ("vision_encoder.neck.layer_norm2.{p}", "image_encoder.neck.3.{p}"),
    # coordinate encoder, prompt encoder
    ("shared_image_embedding.positional_embedding", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    ("prompt_encoder.point_embed.{i}.weight", "prompt_encoder.point_embeddings.{i}.weight"),
    ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
    ("prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"),
    ("prompt_encoder.mask_embed.conv1.{p}", "prompt_encoder.mask_downscaling.0.{p}"),
    ("prompt_encoder.mask_embed.layer_norm1.{p}", "prompt_encoder.mask_downscaling.1.{p}"),
    ("prompt_encoder.mask_embed.conv2.{p}", "prompt_encoder.mask_downscaling.3.{p}"),
    ("prompt_encoder.mask_embed.layer_norm2.{p}", "prompt_encoder.mask_downscaling.4.{p}"),
    ("prompt_encoder.mask_embed.conv3.{p}", "prompt_encoder.mask_downscaling.6.{p}"),
    # mask decoder
    ("mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight"),
    ("mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight"),
    *[(f"mask_decoder.transformer.layers.{{i}}.{attention}.{{proj}}.{{p}}",
       f"mask_decoder.transformer.layers.{{i}}.{attention}.{{proj}}.{{p}}")
      for attention in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")],
    ("mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}", "mask_decoder.transformer.layers.{i}.norm{n}.{p}"),
    ("mask_decoder.transformer.layers.{i}.mlp.lin1.{p}", "mask_decoder.transformer.layers.{i}.mlp.lin1.{p}"),
    ("mask_decoder.transformer.layers.{i}.mlp.lin2.{p}", "mask_decoder.transformer.layers.{i}.mlp.lin2.{p}"),
    ("mask_decoder.transformer.final_attn_token_to_image.{proj}.{p}",
     "mask_decoder.transformer.final_attn_token_to_image.{proj}.{p}"),
    ("mask_decoder.transformer.layer_norm_final_attn.{p}", "mask_decoder.transformer.norm_final_attn.{p}"),
    ("mask_decoder.upscale_conv1.{p}", "mask_decoder.output_upscaling.0.{p}"),
    ("mask_decoder.upscale_layer_norm.{p}", "mask_decoder.output_upscaling.1.{p}"),
    ("mask_decoder.upscale_conv2.{p}", "mask_decoder.output_upscaling.3.{p}"),
    ("mask_decoder.output_hypernetworks_mlps.{i}.{mlp}.{p}", "mask_decoder.output_hypernetworks_mlps.{i}.{mlp}.{p}"),
    ("mask_decoder.iou_prediction_head.{mlp}.{p}", "mask_decoder.iou_prediction_head.{mlp}.{p}"),
    # SamHQModel's mask decoder
    ("mask_decoder.hq_token.weight", "mask_decoder.hf_token.weight"),
    ("mask_decoder.hq_mask_mlp.{mlp}.{p}", "mask_decoder.hf_mlp.{mlp}.{p}"),
    *[(f"mask_decoder.{theirs}{layer}.{{p}}", f"mask_decoder.{meta}.{i}.{{p}}")
      for theirs, meta in (("compress_vit_", "compress_vit_feat"), ("encoder_", "embedding_encoder"),
                           ("mask_", "embedding_maskfeature"))
      for layer, i in (("conv1", 0), ("norm", 1), ("conv2", 3))],
])
_MLP = re.compile(
    r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|hf_mlp))\.(proj_in|proj_out|layers\.(\d+))\."
)


def _wb(*names: str) -> list[str]:
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


_ATTN = [
    f"{a}.{p}_proj"
    for a in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    for p in ("q", "k", "v", "out")
]
# Keys every SamModel has, and per indexed group (indices 0..max) the members every index must
# have. Members that only some configs have (qkv bias, rel_pos tables, MLP middle layers) must
# be present at every index of a group as soon as one index has them.
_REQUIRED = [
    "shared_image_embedding.positional_embedding",
    "vision_encoder.pos_embed",
    *_wb("vision_encoder.patch_embed.projection"),
    "vision_encoder.neck.conv1.weight",
    "vision_encoder.neck.conv2.weight",
    *_wb("vision_encoder.neck.layer_norm1", "vision_encoder.neck.layer_norm2"),
    *[f"prompt_encoder.{n}.weight" for n in ("not_a_point_embed", "no_mask_embed")],
    *[f"prompt_encoder.point_embed.{i}.weight" for i in range(4)],
    *_wb(*[f"prompt_encoder.mask_embed.{n}" for n in ("conv1", "conv2", "conv3", "layer_norm1", "layer_norm2")]),
    *[f"mask_decoder.{n}.weight" for n in ("iou_token", "mask_tokens")],
    *_wb(*[f"mask_decoder.transformer.final_attn_token_to_image.{p}_proj" for p in ("q", "k", "v", "out")]),
    *_wb("mask_decoder.transformer.layer_norm_final_attn"),
    *_wb(*[f"mask_decoder.{n}" for n in ("upscale_conv1", "upscale_layer_norm", "upscale_conv2")]),
    *_wb("mask_decoder.iou_prediction_head.proj_in", "mask_decoder.iou_prediction_head.proj_out"),
]
_GROUPS: list[tuple[str, list[str]]] = [
    (
        "vision_encoder.layers",
        ["attn.qkv.weight", *_wb("layer_norm1", "layer_norm2", "attn.proj", "mlp.lin1", "mlp.lin2")],
    ),
    ("mask_decoder.transformer.layers", _wb(*_ATTN, *[f"layer_norm{i}" for i in range(1, 5)], "mlp.lin1", "mlp.lin2")),
    ("mask_decoder.output_hypernetworks_mlps", _wb("proj_in", "proj_out")),
]


def _check_complete(state: Mapping[str, np.ndarray], keys: set[str]) -> None:
    missing = [k for k in _REQUIRED if k not in keys]
    # One hypernetwork MLP per mask token.
    least = {"mask_decoder.output_hypernetworks_mlps": len(state.get("mask_decoder.mask_tokens.weight", ()))}
    for prefix, members in _GROUPS:
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)")
        by_index: dict[int, set[str]] = {}
        for key in keys:
            if m := pattern.fullmatch(key):
                by_index.setdefault(int(m.group(1)), set()).add(m.group(2))
        needed = set(members).union(*by_index.values())
        for i in range(max(max(by_index, default=0) + 1, least.get(prefix, 0))):
            missing += [f"{prefix}.{i}.{s}" for s in sorted(needed - by_index.get(i, set()))]
    if missing:
        raise CheckpointError(f"Hugging Face SAM checkpoint: missing key(s) {few(missing)}")


def hf_to_meta(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers SamModel state dict (the `model.safetensors` of facebook/sam-vit-{base,large,huge}) -> Meta names.

    Raise CheckpointError naming the key for anything unmapped or missing.
    """
    keys = set(state) - {_TIED_PE}
    renamed = {key: HF_NAMES.ours(key) for key in sorted(keys)}
    unmapped = [key for key, name in renamed.items() if name is None]
    if unmapped:
        raise CheckpointError(f"Hugging Face SAM checkpoint: unexpected key(s) {few(unmapped)}")
    _check_complete(state, keys)

    # transformers MLP (proj_in, layers.0..k-1, proj_out) -> Meta MLP (layers.0..k+1).
    middle: dict[str, int] = {}
    for name in renamed.values():
        if (m := _MLP.match(name)) and m.group(3) is not None:
            middle[m.group(1)] = max(middle.get(m.group(1), 0), int(m.group(3)) + 1)

    def mlp_index(m: re.Match) -> str:
        if m.group(2) == "proj_in":
            index = 0
        elif m.group(2) == "proj_out":
            index = middle.get(m.group(1), 0) + 1
        else:
            index = int(m.group(3)) + 1
        return f"{m.group(1)}.layers.{index}."

    return {_MLP.sub(mlp_index, renamed[key]): state[key] for key in renamed}
