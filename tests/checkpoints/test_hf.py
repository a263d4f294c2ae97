"""Hugging Face transformers SamModel checkpoints vs transformers' own forward, random weights, a real photo.

A small random ``transformers.SamModel`` is written with ``save_pretrained`` (the
``model.safetensors`` layout of facebook/sam-vit-*), loaded by ``sam_mlx.load`` and both
run the same preprocessed image and the same prompts in the 1024 input frame: sam_mlx's
plain reference model and its fast path (what the predictor runs).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers  # noqa: E402  (a test reference, installed by .ci/run)
from PIL import Image

import sam_mlx
from helpers import IMAGES
from reference import randomize_transformers_sam
from sam_mlx.checkpoints.hf import hf_to_meta
from sam_mlx.fast import FastSam
from sam_mlx.transforms import ImageGeometry, image_geometry, preprocess

# Window attention (14x14 windows, grid padded 64 -> 70) in blocks 0 and 2, global in 1 and 3.
VISION = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, global_attn_indexes=[1, 3], window_size=14)

# Coordinates in the 1024 x 684 resized dog photo (the 1024 x 1024 encoder input frame).
PROMPTS = {
    "point": dict(points=([[512.0, 300.0]], [1])),
    "points_fg_bg": dict(points=([[512.0, 300.0], [700.5, 420.25], [150.0, 600.0]], [1, 1, 0])),
    "box": dict(box=[300.0, 120.0, 760.0, 640.0]),
    "box_and_points": dict(box=[300.0, 120.0, 760.0, 640.0], points=([[520.0, 330.0], [320.0, 600.0]], [1, 0])),
}


def _random_hf_model() -> "transformers.SamModel":
    torch.manual_seed(0)
    config = transformers.SamConfig(vision_config=transformers.SamVisionConfig(**VISION).to_dict())
    return randomize_transformers_sam(transformers.SamModel(config))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = _random_hf_model()
    folder = tmp_path_factory.mktemp("hf_sam")
    hf.save_pretrained(folder)
    image = np.asarray(Image.open(IMAGES / "dog.jpg").convert("RGB"))
    pixels = preprocess(image, image_geometry(image.shape[:2]))  # 1 x 1024 x 1024 x 3
    ours = sam_mlx.load(str(folder / "model.safetensors"))
    with torch.no_grad():
        hf_embedding = hf.get_image_embeddings(torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2))
    fast = FastSam(ours)
    tokens = {"plain": ours.encode_image(pixels), "fast": fast.encode(pixels)}
    mx.eval(tokens)
    frame = ImageGeometry((1024, 1024), (1024, 1024), (1024, 1024))  # prompts in the encoder input's pixels
    return hf, hf_embedding, ours, tokens, folder / "model.safetensors", fast.prepare(tokens["fast"], frame)


def test_saved_file_is_hf_format(models):
    from safetensors import safe_open

    path = models[4]
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
    assert "shared_image_embedding.positional_embedding" in keys
    assert any(k.startswith("vision_encoder.layers.") for k in keys)


def test_config_inferred(models):
    ours = models[2]
    enc = ours.config.encoder
    assert (enc.embed_dim, enc.depth, enc.num_heads, enc.window_size) == (96, 4, 3, 14)
    assert enc.global_attention_blocks == (1, 3)


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_image_embedding(models, path):
    _, hf_embedding, _, tokens, *_ = models
    got = np.array(tokens[path]).transpose(0, 3, 1, 2)
    assert got.shape == tuple(hf_embedding.shape) == (1, 256, 64, 64)
    assert np.abs(got - hf_embedding.numpy()).max() <= 1e-3


def _hf_decode(hf, embedding, prompt, multimask):
    kwargs = {}
    if "points" in prompt:
        coords, labels = prompt["points"]
        kwargs["input_points"] = torch.tensor([[coords]], dtype=torch.float32)  # B x point_batch x N x 2
        kwargs["input_labels"] = torch.tensor([[labels]], dtype=torch.long)  # B x point_batch x N
    if "box" in prompt:
        kwargs["input_boxes"] = torch.tensor([[prompt["box"]]], dtype=torch.float32)  # B x boxes x 4
    with torch.no_grad():
        out = hf(image_embeddings=embedding, multimask_output=multimask, **kwargs)
    return out.pred_masks[:, 0].numpy(), out.iou_scores[:, 0].numpy()  # B x C x 256 x 256, B x C


def _our_decode(models, path, prompt, multimask):
    _, _, ours, tokens, _, image = models
    points = None
    if "points" in prompt:
        coords, labels = prompt["points"]
        points = (mx.array([coords], dtype=mx.float32), mx.array([labels], dtype=mx.int32))
    boxes = mx.array([prompt["box"]], dtype=mx.float32) if "box" in prompt else None
    if path == "fast":
        return FastSam(ours).decode(image, points, boxes, None, multimask)
    logits, iou = ours.decode(tokens["plain"], (1024, 1024), points=points, boxes=boxes, multimask_output=multimask)
    return np.array(logits), np.array(iou)


@pytest.mark.parametrize("path", ["plain", "fast"])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_prompt_outputs(models, prompt, multimask, path):
    hf, hf_embedding = models[:2]
    ref_logits, ref_iou = _hf_decode(hf, hf_embedding, PROMPTS[prompt], multimask)
    logits, iou = _our_decode(models, path, PROMPTS[prompt], multimask)
    assert logits.shape == ref_logits.shape == (1, 3 if multimask else 1, 256, 256)
    assert iou.shape == ref_iou.shape
    assert np.abs(logits - ref_logits).max() <= 1e-3
    assert np.abs(iou - ref_iou).max() <= 1e-4


def _hf_state() -> dict[str, np.ndarray]:
    config = transformers.SamConfig(
        vision_config=transformers.SamVisionConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1], image_size=256
        ).to_dict()
    )
    return {k: v.numpy() for k, v in transformers.SamModel(config).state_dict().items()}


def test_mapping_covers_meta_names():
    from reference import build_reference_sam, state_dict_numpy

    state = _hf_state()
    assert "prompt_encoder.shared_embedding.positional_embedding" in state  # the tied copy is ignored
    meta = hf_to_meta(state)
    ref = state_dict_numpy(
        build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), image_size=256)
    )
    ref = {k: v for k, v in ref.items() if k not in ("pixel_mean", "pixel_std")}
    assert {k: v.shape for k, v in meta.items()} == {k: v.shape for k, v in ref.items()}
    assert meta["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] is state[
        "shared_image_embedding.positional_embedding"
    ]
    assert meta["mask_decoder.output_hypernetworks_mlps.2.layers.2.weight"] is state[
        "mask_decoder.output_hypernetworks_mlps.2.proj_out.weight"
    ]
    assert meta["mask_decoder.iou_prediction_head.layers.1.bias"] is state[
        "mask_decoder.iou_prediction_head.layers.0.bias"
    ]


@pytest.mark.parametrize(
    "key",
    [
        "vision_encoder.layers.1.attn.rel_pos_w",
        "vision_encoder.neck.layer_norm2.bias",
        "prompt_encoder.point_embed.3.weight",
        "mask_decoder.transformer.layers.1.layer_norm3.weight",
        "mask_decoder.output_hypernetworks_mlps.2.layers.0.weight",
        "mask_decoder.iou_prediction_head.proj_out.bias",
    ],
)
def test_missing_key_is_named(key, tmp_path):
    state = _hf_state()
    del state[key]
    with pytest.raises(sam_mlx.CheckpointError, match=key.replace(".", r"\.")):
        hf_to_meta(state)
    # and through the loader, from a file
    from safetensors.numpy import save_file

    del state["prompt_encoder.shared_embedding.positional_embedding"]
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(sam_mlx.CheckpointError, match=key.replace(".", r"\.")):
        sam_mlx.load(str(path))


def test_unexpected_key_is_named():
    state = _hf_state()
    state["mask_decoder.extra_head.weight"] = np.zeros(3, np.float32)
    with pytest.raises(sam_mlx.CheckpointError, match=r"mask_decoder\.extra_head\.weight"):
        hf_to_meta(state)
