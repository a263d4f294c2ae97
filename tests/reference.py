"""The original PyTorch SAM (Meta's segment-anything) as a test reference.

segment-anything's package ``__init__`` imports torchvision, which has no build here,
so its ``modeling`` subpackage is imported under a bare parent package instead.
A missing reference package is a ModuleNotFoundError saying how to install the test references.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types

import numpy as np

INSTALL_HINT = "install the test references: bash .ci/run (or pip install torch==2.13.0 -e '.[cpu,export,test]')"


def require(module: str, package: str):
    """The import spec of a reference module, or a ModuleNotFoundError naming the package to install."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ModuleNotFoundError(f"the tests compare with {package}, which is not installed: {INSTALL_HINT}",
                                  name=module)
    return spec


require("torch", "PyTorch (torch)")
import torch  # noqa: E402


def segment_anything_modeling():
    if "segment_anything" not in sys.modules:
        spec = require("segment_anything", "Meta's segment-anything")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    return importlib.import_module("segment_anything.modeling")


def build_reference_sam(
    embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14,
    image_size=1024, seed=0,
):
    """A Meta ``Sam`` with random weights; relative position tables and position encodings non-zero."""
    m = segment_anything_modeling()
    from functools import partial

    torch.manual_seed(seed)
    grid = image_size // 16
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=num_heads, patch_size=16,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn_indexes,
            window_size=window_size, out_chans=256,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    ).eval()
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
            if name.endswith("iou_token.weight") or name.endswith("mask_tokens.weight"):
                p.normal_(0, 1.0)
            # LayerNorm weights default to 1 and biases to 0: perturb so the test sees them.
            if ("norm" in name or "neck.1" in name or "neck.3" in name) and p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return sam


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _install_torchvision_shim() -> None:
    """segment-anything's transforms import two torchvision functions; give it PIL-based ones.

    For a PIL image, torchvision's ``resize(img, (h, w))`` is ``img.resize((w, h), BILINEAR)``
    and ``to_pil_image`` of an H x W x 3 uint8 array is ``Image.fromarray``.
    """
    if "torchvision" in sys.modules:
        return
    from PIL import Image

    functional = types.ModuleType("torchvision.transforms.functional")
    functional.to_pil_image = lambda array: Image.fromarray(array)
    functional.resize = lambda image, size: image.resize((size[1], size[0]), Image.BILINEAR)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})


def reference_predictor_class():
    """segment-anything's original ``SamPredictor``."""
    segment_anything_modeling()
    _install_torchvision_shim()
    return importlib.import_module("segment_anything.predictor").SamPredictor


def _torch_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS as torchvision's CPU kernel: stable descending sort, drop IoU > threshold."""
    x0, y0, x1, y1 = boxes.unbind(1)
    areas = (x1 - x0) * (y1 - y0)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x1[i], x1) - torch.maximum(x0[i], x0)).clamp(min=0)
        h = (torch.minimum(y1[i], y1) - torch.maximum(y0[i], y0)).clamp(min=0)
        inter = w * h
        suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def _torch_batched_nms(boxes, scores, idxs, iou_threshold):
    """NMS per category, by shifting each category's boxes apart (torchvision's trick)."""
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64)
    shifted = boxes + idxs.to(boxes)[:, None] * (boxes.max() + 1)
    return _torch_nms(shifted, scores, iou_threshold)


def _install_torchvision_ops() -> None:
    """torchvision.ops.boxes with the two functions segment-anything's generator imports."""
    _install_torchvision_shim()
    if "torchvision.ops.boxes" in sys.modules:
        return
    boxes = types.ModuleType("torchvision.ops.boxes")
    boxes.batched_nms = _torch_batched_nms
    boxes.box_area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ops = types.ModuleType("torchvision.ops")
    ops.boxes = boxes
    sys.modules["torchvision"].ops = ops
    sys.modules.update({"torchvision.ops": ops, "torchvision.ops.boxes": boxes})


def reference_generator_class():
    """segment-anything's original ``SamAutomaticMaskGenerator``."""
    segment_anything_modeling()
    _install_torchvision_ops()
    return importlib.import_module("segment_anything.automatic_mask_generator").SamAutomaticMaskGenerator


def _bare_package(name: str, path: str) -> None:
    """Register ``name`` as a package of the modules in ``path`` without running its ``__init__``."""
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package


def _timm_shim() -> dict[str, types.ModuleType]:
    """segment-anything-hq's TinyViT imports four helpers from timm (not installed: it needs torchvision).
    In eval mode with a drop-path rate of 0 DropPath is the identity."""

    class DropPath(torch.nn.Module):
        def __init__(self, drop_prob: float = 0.0):
            super().__init__()
            self.drop_prob = drop_prob

        def forward(self, x):
            return x

    layers = types.ModuleType("timm.models.layers")
    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = torch.nn.init.trunc_normal_
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn
    models = types.ModuleType("timm.models")
    models.layers, models.registry = layers, registry
    timm = types.ModuleType("timm")
    timm.models = models
    return {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}


def segment_anything_hq_modeling() -> types.SimpleNamespace:
    """segment-anything-hq's model modules (its package ``__init__`` needs torchvision and its ``modeling``
    ``__init__`` timm: both are bypassed)."""
    if "segment_anything_hq" not in sys.modules:
        spec = require("segment_anything_hq", "SysCV's segment-anything-hq (pip install --no-deps segment-anything-hq)")
        _bare_package("segment_anything_hq", spec.submodule_search_locations[0])
    root = sys.modules["segment_anything_hq"].__path__[0]
    _bare_package("segment_anything_hq.modeling", f"{root}/modeling")
    shim = {} if "segment_anything_hq.modeling.tiny_vit_sam" in sys.modules else _timm_shim()
    sys.modules.update(shim)
    try:
        modules = {name: importlib.import_module(f"segment_anything_hq.modeling.{name}") for name in
                   ("image_encoder", "mask_decoder_hq", "prompt_encoder", "transformer", "sam", "tiny_vit_sam")}
    finally:  # the shim only while TinyViT's module binds its names: a fake timm would mislead later imports
        for name in shim:
            sys.modules.pop(name, None)
    modeling = sys.modules["segment_anything_hq.modeling"]
    modeling.Sam = modules["sam"].Sam  # what its predictor imports from the package
    return types.SimpleNamespace(
        Sam=modules["sam"].Sam, ImageEncoderViT=modules["image_encoder"].ImageEncoderViT,
        TinyViT=modules["tiny_vit_sam"].TinyViT, MaskDecoderHQ=modules["mask_decoder_hq"].MaskDecoderHQ,
        PromptEncoder=modules["prompt_encoder"].PromptEncoder,
        TwoWayTransformer=modules["transformer"].TwoWayTransformer,
    )


def build_reference_hq_sam(encoder: str = "vit", seed: int = 0, image_size: int = 1024, **vit):
    """An HQ-SAM (segment-anything-hq's ``Sam`` with ``MaskDecoderHQ``) with random weights: ``encoder`` "vit"
    (``vit``: embed_dim, depth, num_heads, global_attn_indexes, window_size; ViT-B by default) or "tiny_vit"
    (Light HQ-SAM's TinyViT-5M, whose original takes a 1024 x 1024 input only)."""
    m = segment_anything_hq_modeling()
    from functools import partial

    torch.manual_seed(seed)
    if encoder == "vit":
        shape = dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14) | vit
        image_encoder = m.ImageEncoderViT(
            img_size=image_size, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), patch_size=16,
            qkv_bias=True, use_rel_pos=True, out_chans=256, **shape,
        )
        early_dim = shape["embed_dim"]
    else:
        image_encoder = m.TinyViT(
            img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
            use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
        )
        early_dim = 160
    sam = m.Sam(
        image_encoder=image_encoder,
        prompt_encoder=m.PromptEncoder(embed_dim=256, image_embedding_size=(image_size // 16, image_size // 16),
                                       input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=m.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256, vit_dim=early_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    with torch.no_grad():
        for module in sam.modules():  # TinyViT's BatchNorms: statistics a trained model would have
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for name, p in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or "attention_biases" in name:
                p.normal_(0, 0.5)
            if name.split(".")[-2] in ("iou_token", "mask_tokens", "hf_token"):
                p.normal_(0, 1.0)
            hq_norm = re.search(r"(compress_vit_feat|embedding_encoder|embedding_maskfeature)\.1\.", name)
            if p.ndim == 1 and ("norm" in name or "neck.1" in name or "neck.3" in name or ".bn." in name or hq_norm):
                p.add_(torch.randn_like(p) * 0.1)
    return sam.eval()  # again: TinyViT's attention caches its bias table when set to eval mode


def reference_hq_predictor_class():
    """segment-anything-hq's ``SamPredictor`` (``predict(..., hq_token_only=False)``)."""
    segment_anything_hq_modeling()
    _install_torchvision_shim()
    return importlib.import_module("segment_anything_hq.predictor").SamPredictor


def randomize_transformers_sam(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A transformers ``SamModel`` / ``SamHQModel`` with PyTorch's default inits (as Meta's modules have, not
    transformers' small ones), relative position tables and position encodings N(0, 0.5), the Gaussian matrix
    N(0, 1) as Meta's, and LayerNorms moved off 1 and 0 so that the tests see them; in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Embedding)):
                module.reset_parameters()
        for name, p in model.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.5)
            elif name.endswith("positional_embedding"):
                p.normal_(0, 1.0)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def predictor_pair(ref_model: torch.nn.Module, predictor_class: type, path) -> tuple:
    """(the reference predictor, sam_mlx's predictor) on ``truck.jpg`` for the same random weights: the reference
    model's state dict is saved at ``path`` (a .pth) and loaded by sam_mlx from there."""
    from PIL import Image

    import sam_mlx
    from helpers import IMAGES

    torch.save(ref_model.state_dict(), path)
    image = np.asarray(Image.open(IMAGES / "truck.jpg").convert("RGB"))
    ref = predictor_class(ref_model)
    with torch.no_grad():
        ref.set_image(image)
    ours = sam_mlx.SamPredictor(sam_mlx.load(str(path)))
    ours.set_image(image)
    return ref, ours


class _TinyViTTokens(torch.nn.Module):
    """segment-anything-hq's TinyViT (MobileSAM's, which also hands back its early features) as Meta's ``Sam``
    takes an image encoder: the image tokens only, and ``img_size``."""

    def __init__(self, tiny_vit: torch.nn.Module):
        super().__init__()
        self.tiny_vit = tiny_vit
        self.img_size = tiny_vit.img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tiny_vit(x)[0]


def build_reference_mobile_sam(checkpoint) -> torch.nn.Module:
    """MobileSAM in PyTorch: Meta's ``Sam``, prompt encoder and mask decoder with MobileSAM's TinyViT-5M (from
    segment-anything-hq, whose TinyViT is MobileSAM's) as the image encoder, every weight from ``checkpoint``."""
    m = segment_anything_modeling()
    tiny_vit = segment_anything_hq_modeling().TinyViT(
        img_size=1024, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
        use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8,
    )
    sam = m.Sam(
        image_encoder=_TinyViTTokens(tiny_vit),
        prompt_encoder=m.PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                       mask_in_chans=16),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {k.replace("image_encoder.", "image_encoder.tiny_vit.", 1): v for k, v in state.items()}
    sam.load_state_dict(state)
    return sam.eval()  # TinyViT's attention caches its bias table when set to eval mode


def reference_transforms_module():
    """segment-anything's ``utils.transforms`` (``ResizeLongestSide``), torchvision's two functions shimmed."""
    segment_anything_modeling()
    _install_torchvision_shim()
    return importlib.import_module("segment_anything.utils.transforms")
