"""Meta's SAM checkpoints (and MobileSAM's, in the same names) -> sam_mlx's parameters and config.

Meta's names are the lingua franca of SAM checkpoints (transformers' are first brought to them,
``hf``). sam_mlx names its components as the model's explainer does: the mask hint encoder is part of
the mask decoder, the coordinate encoder stands on its own, the ViT's blocks are grouped in stages.
Conv kernels move to MLX's channels-last layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
from mlx.utils import tree_flatten

from .. import resources
from ..config import PromptDecoderConfig, SamConfig, TinyViTConfig, ViTConfig
from ..modeling.sam import Sam
from .errors import CheckpointError, checked, checked_shape
from .names import NameTable
from .tiny_vit import convert_tiny_vit_weights, infer_tiny_vit_config

# Meta's name -> sam_mlx's. A ViT block's index is that of its stage's blocks in sam_mlx.
META_NAMES = NameTable([
    # image encoder (ViT)
    ("image_encoder.patch_embed.proj.{p}", "image_encoder.patch_embedding.{p}"),
    ("image_encoder.pos_embed", "image_encoder.position_encoding.embedding"),
    ("image_encoder.blocks.{block}.{rest}", "image_encoder.stages.{stage}.blocks.{index}.{rest}"),
    ("image_encoder.neck.0.weight", "image_encoder.channel_projection.conv1.weight"),
    ("image_encoder.neck.1.{p}", "image_encoder.channel_projection.norm1.{p}"),
    ("image_encoder.neck.2.weight", "image_encoder.channel_projection.conv2.weight"),
    ("image_encoder.neck.3.{p}", "image_encoder.channel_projection.norm2.{p}"),
    # coordinate encoder
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "coordinate_encoder.gaussian_matrix"),
    # prompt encoder
    ("prompt_encoder.point_embeddings.0.weight", "prompt_encoder.background_embedding"),
    ("prompt_encoder.point_embeddings.1.weight", "prompt_encoder.foreground_embedding"),
    ("prompt_encoder.point_embeddings.2.weight", "prompt_encoder.box_top_left_embedding"),
    ("prompt_encoder.point_embeddings.3.weight", "prompt_encoder.box_bottom_right_embedding"),
    ("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embedding"),
    # mask decoder: mask hint encoder
    ("prompt_encoder.mask_downscaling.0.{p}", "mask_decoder.mask_hint_encoder.conv1.{p}"),
    ("prompt_encoder.mask_downscaling.1.{p}", "mask_decoder.mask_hint_encoder.norm1.{p}"),
    ("prompt_encoder.mask_downscaling.3.{p}", "mask_decoder.mask_hint_encoder.conv2.{p}"),
    ("prompt_encoder.mask_downscaling.4.{p}", "mask_decoder.mask_hint_encoder.norm2.{p}"),
    ("prompt_encoder.mask_downscaling.6.{p}", "mask_decoder.mask_hint_encoder.conv3.{p}"),
    ("prompt_encoder.no_mask_embed.weight", "mask_decoder.mask_hint_encoder.no_mask_embedding"),
    # mask decoder: output tokens, two-way transformer
    ("mask_decoder.iou_token.weight", "mask_decoder.iou_token"),
    ("mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens"),
    ("mask_decoder.transformer.{rest}", "mask_decoder.transformer.{rest}"),
    # mask decoder: mask generator (image upscaler, one MLP per mask token), IoU MLP
    ("mask_decoder.output_upscaling.0.{p}", "mask_decoder.mask_generator.upscaler.conv1.{p}"),
    ("mask_decoder.output_upscaling.1.{p}", "mask_decoder.mask_generator.upscaler.norm.{p}"),
    ("mask_decoder.output_upscaling.3.{p}", "mask_decoder.mask_generator.upscaler.conv2.{p}"),
    ("mask_decoder.output_hypernetworks_mlps.{i}.{rest}", "mask_decoder.mask_generator.mask_token_mlps.{i}.{rest}"),
    ("mask_decoder.iou_prediction_head.{rest}", "mask_decoder.iou_mlp.{rest}"),
    # HQ-SAM's mask decoder: the HQ token and its MLP, the early features' and image tokens' upscalers (the
    # HQ features), the refiner of SAM's upscaled features
    ("mask_decoder.hf_token.weight", "mask_decoder.hq_token"),
    ("mask_decoder.hf_mlp.{rest}", "mask_decoder.hq_mask_mlp.{rest}"),
    *[(f"mask_decoder.{theirs}.{i}.{{p}}", f"mask_decoder.{ours}.{layer}.{{p}}")
      for theirs, ours in (("compress_vit_feat", "early_feature_upscaler"),
                           ("embedding_encoder", "image_token_upscaler"),
                           ("embedding_maskfeature", "mask_feature_refiner"))
      for i, layer in ((0, "conv1"), (1, "norm"), (3, "conv2"))],
])

# Meta's layout -> sam_mlx's, by the sam_mlx weight's owner: convs O x I x kh x kw -> O x kh x kw x I,
# transposed convs I x O x kh x kw -> O x kh x kw x I.
_CONV = re.compile(r"(patch_embedding|channel_projection\.conv\d|mask_hint_encoder\.conv\d"
                   r"|mask_feature_refiner\.conv\d)\.weight$")
_CONV_TRANSPOSE = re.compile(r"upscaler\.conv\d\.weight$")  # also HQ-SAM's early_feature_, image_token_upscaler


def _layout(name: str) -> tuple[int, ...] | None:
    """The axes permutation from Meta's layout of a weight to sam_mlx's, if it changes."""
    if _CONV.search(name):
        return (0, 2, 3, 1)
    if _CONV_TRANSPOSE.search(name):
        return (1, 2, 3, 0)
    return None


def infer_vit_config(state: Mapping[str, np.ndarray]) -> ViTConfig:
    """Infer a ViT encoder config from Meta-format ``image_encoder.*`` weights."""
    embed_dim, _, patch_size, _ = checked_shape(state, "image_encoder.patch_embed.proj.weight", 4,
                                                "embed_dim x 3 x patch x patch")
    pos = checked_shape(state, "image_encoder.pos_embed", 4, f"1 x g x g x {embed_dim}")
    if pos[3] != embed_dim:
        raise CheckpointError(f"image_encoder.pos_embed has shape {pos}, expected 1 x g x g x {embed_dim}")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    if depth == 0:
        raise CheckpointError("no image_encoder.blocks.* keys")
    if "image_encoder.blocks.0.attn.rel_pos_h" not in state:
        raise CheckpointError("image encoder without relative position tables is not a SAM v1 encoder")
    grid = pos[1]
    global_blocks, window = [], 0
    for i in range(depth):  # a table spanning the whole grid marks a global-attention block
        rows, head_dim = checked_shape(state, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2,
                                       "(2 x window - 1) x head_dim")
        size = (rows + 1) // 2
        if size == grid:
            global_blocks.append(i)
        else:
            window = size
    return ViTConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attention_blocks=tuple(global_blocks),
        window_size=window,
        patch_size=patch_size,
        pretrain_grid=grid,
        mlp_dim=checked_shape(state, "image_encoder.blocks.0.mlp.lin1.weight", 2, "mlp_dim x embed_dim")[0],
        out_chans=checked_shape(state, "image_encoder.neck.0.weight", 4, "out_chans x embed_dim x 1 x 1")[0],
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        use_rel_pos=True,
    )


def infer_decoder_config(state: Mapping[str, np.ndarray]) -> PromptDecoderConfig:
    """Infer the prompt encoder / mask decoder config from Meta-format weights."""
    # The head count is not visible in the weights; every SAM v1 decoder uses 8.
    layers = {int(m.group(1)) for k in state if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    iou_layers = [k for k in state if re.fullmatch(r"mask_decoder\.iou_prediction_head\.layers\.\d+\.weight", k)]
    return PromptDecoderConfig(
        embed_dim=checked_shape(state, "mask_decoder.iou_token.weight", 2, "1 x embed_dim")[1],
        mask_in_chans=checked_shape(state, "prompt_encoder.mask_downscaling.3.weight", 4,
                                    "mask_in_chans x mask_in_chans/4 x 2 x 2")[0],
        num_multimask_outputs=checked_shape(state, "mask_decoder.mask_tokens.weight", 2,
                                            "(multimask outputs + 1) x embed_dim")[0] - 1,
        transformer_depth=len(layers),
        transformer_mlp_dim=checked_shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 2,
                                          "mlp_dim x embed_dim")[0],
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=checked_shape(state, "mask_decoder.iou_prediction_head.layers.0.weight", 2,
                                          "hidden_dim x embed_dim")[0],
    )


def _meta_name(name: str, encoder: ViTConfig | TinyViTConfig) -> str:
    """The Meta name of sam_mlx parameter ``name``."""
    found = META_NAMES.theirs(name)
    if found is None:
        raise CheckpointError(f"no Meta name for sam_mlx parameter {name}")
    pattern, values = found
    if "stage" in values and isinstance(encoder, ViTConfig):
        values["block"] = str(encoder.stages[int(values.pop("stage"))][int(values.pop("index"))])
    return pattern.format(**values)


def convert_meta(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], SamConfig]:
    """Meta-format state dict (SAM ViT or MobileSAM; HQ-SAM's, with ``mask_decoder.hf_token``) -> (sam_mlx weights,
    config).

    Every parameter of the model the weights imply is looked up by its Meta name; a missing, mis-shaped,
    non-float or left-over key raises CheckpointError naming it. The config is inferred from names and
    shapes alone and the model's size checked before any weight is read (lazy tensors stay lazy through
    renaming and transposing; TinyViT's BatchNorms are folded after the check).
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    weights: dict[str, np.ndarray] = {}
    if "image_encoder.patch_embed.proj.weight" in state:
        encoder: ViTConfig | TinyViTConfig = infer_vit_config(state)
    elif any(k.startswith("image_encoder.layers.") for k in state):
        encoder = infer_tiny_vit_config(state, prefix="image_encoder.")
    else:
        raise CheckpointError("no image encoder weights "
                              "(image_encoder.patch_embed.proj.weight or image_encoder.layers.*)")
    config = SamConfig(encoder=encoder, decoder=infer_decoder_config(state), image_size=_image_size(encoder),
                       hq="mask_decoder.hf_token.weight" in state)
    try:
        model = Sam(config)
    except ValueError as exc:
        raise CheckpointError(f"weights imply an impossible model ({exc})") from exc
    check_model_fits(config, model)
    if isinstance(encoder, TinyViTConfig):
        weights.update({f"image_encoder.{k}": v for k, v in convert_tiny_vit_weights(state, "image_encoder.").items()})

    used = set()
    for name, param in tree_flatten(model.parameters()):
        if name in weights:  # the TinyViT encoder's, converted above
            continue
        meta_name, axes = _meta_name(name, encoder), _layout(name)
        shape = param.shape if axes is None else tuple(param.shape[a] for a in np.argsort(axes))
        value = checked(state, meta_name, shape)
        weights[name] = value if axes is None else value.transpose(*axes)
        used.add(meta_name)
    unexpected = sorted(k for k in set(state) - used if not (isinstance(encoder, TinyViTConfig)
                                                               and k.startswith("image_encoder.")))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(f"unexpected weights {shown}")
    return weights, config


def check_model_fits(config: SamConfig, model: Sam | None = None) -> None:
    """Refuse a config whose float32 weights alone would exceed this machine's memory: a crafted or damaged
    file can describe a model of any size, and nothing of it is read before this check."""
    model = Sam(config) if model is None else model  # parameters not evaluated: no memory yet
    count = sum(v.size for _, v in tree_flatten(model.parameters()))
    available = resources.machine_memory()  # through the module: tests stand in for it there
    if available is not None and 4 * count > available:
        raise CheckpointError(f"the weights describe a {config.name} model of {count / 1e6:.0f} M parameters "
                              f"({resources.format_bytes(4 * count)} as float32), more than this machine's memory "
                              f"({resources.format_bytes(available)})")


def _image_size(encoder: ViTConfig | TinyViTConfig) -> int:
    return encoder.pretrain_grid * encoder.patch_size if isinstance(encoder, ViTConfig) else 1024
