"""Hugging Face transformers ``SamModel`` state dict -> Meta's original SAM key names.

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
from typing import Mapping

import numpy as np

from .torch_pickle import CheckpointError

_TIED_PE = "prompt_encoder.shared_embedding.positional_embedding"

# transformers name (full match) -> Meta name; first match wins. MLP renumbering is done after.
_RENAMES: list[tuple[str, str]] = [
    (r"shared_image_embedding\.positional_embedding", "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"vision_encoder\.pos_embed", "image_encoder.pos_embed"),
    (r"vision_encoder\.patch_embed\.projection\.(weight|bias)", r"image_encoder.patch_embed.proj.\1"),
    (r"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"image_encoder.blocks.\1.norm\2.\3"),
    (r"vision_encoder\.layers\.(\d+)\.attn\.(rel_pos_[hw]|(?:qkv|proj)\.(?:weight|bias))",
     r"image_encoder.blocks.\1.attn.\2"),
    (r"vision_encoder\.layers\.(\d+)\.mlp\.(lin[12]\.(?:weight|bias))", r"image_encoder.blocks.\1.mlp.\2"),
    (r"vision_encoder\.neck\.conv1\.weight", "image_encoder.neck.0.weight"),
    (r"vision_encoder\.neck\.layer_norm1\.(weight|bias)", r"image_encoder.neck.1.\1"),
    (r"vision_encoder\.neck\.conv2\.weight", "image_encoder.neck.2.weight"),
    (r"vision_encoder\.neck\.layer_norm2\.(weight|bias)", r"image_encoder.neck.3.\1"),
    (r"prompt_encoder\.point_embed\.(\d+)\.weight", r"prompt_encoder.point_embeddings.\1.weight"),
    (r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", r"prompt_encoder.\1.weight"),
    (r"prompt_encoder\.mask_embed\.conv1\.(weight|bias)", r"prompt_encoder.mask_downscaling.0.\1"),
    (r"prompt_encoder\.mask_embed\.layer_norm1\.(weight|bias)", r"prompt_encoder.mask_downscaling.1.\1"),
    (r"prompt_encoder\.mask_embed\.conv2\.(weight|bias)", r"prompt_encoder.mask_downscaling.3.\1"),
    (r"prompt_encoder\.mask_embed\.layer_norm2\.(weight|bias)", r"prompt_encoder.mask_downscaling.4.\1"),
    (r"prompt_encoder\.mask_embed\.conv3\.(weight|bias)", r"prompt_encoder.mask_downscaling.6.\1"),
    (r"mask_decoder\.(iou_token|mask_tokens)\.weight", r"mask_decoder.\1.weight"),
    (
        r"mask_decoder\.transformer\.(layers\.\d+\.(?:self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
        r"|final_attn_token_to_image)\.((?:q|k|v|out)_proj\.(?:weight|bias))",
        r"mask_decoder.transformer.\1.\2",
    ),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])\.(weight|bias)",
     r"mask_decoder.transformer.layers.\1.norm\2.\3"),
    (r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12]\.(?:weight|bias))",
     r"mask_decoder.transformer.layers.\1.mlp.\2"),
    (r"mask_decoder\.transformer\.layer_norm_final_attn\.(weight|bias)",
     r"mask_decoder.transformer.norm_final_attn.\1"),
    (r"mask_decoder\.upscale_conv1\.(weight|bias)", r"mask_decoder.output_upscaling.0.\1"),
    (r"mask_decoder\.upscale_layer_norm\.(weight|bias)", r"mask_decoder.output_upscaling.1.\1"),
    (r"mask_decoder\.upscale_conv2\.(weight|bias)", r"mask_decoder.output_upscaling.3.\1"),
    # Left in transformers' MLP naming here; renumbered below once each MLP's depth is known.
    (r"mask_decoder\.(output_hypernetworks_mlps\.\d+|iou_prediction_head)\.((?:proj_in|proj_out|layers\.\d+)\."
     r"(?:weight|bias))", r"mask_decoder.\1.\2"),
]
_RENAMES_RE = [(re.compile(p), r) for p, r in _RENAMES]
_MLP = re.compile(
    r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.(proj_in|proj_out|layers\.(\d+))\."
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


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


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
        raise CheckpointError(f"Hugging Face SAM checkpoint: missing key(s) {_few(missing)}")


def hf_to_meta(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers SamModel state dict (the `model.safetensors` of facebook/sam-vit-{base,large,huge}) -> Meta names.

    Raise sam_mlx.torch_pickle.CheckpointError naming the key for anything unmapped or missing.
    """
    keys = set(state) - {_TIED_PE}
    unmapped = []
    renamed: dict[str, str] = {}
    for key in sorted(keys):
        for pattern, replacement in _RENAMES_RE:
            if pattern.fullmatch(key):
                renamed[key] = pattern.sub(replacement, key)
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"Hugging Face SAM checkpoint: unexpected key(s) {_few(unmapped)}")
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
