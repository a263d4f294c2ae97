"""HQ-SAM vs SysCV's original PyTorch code (segment-anything-hq) and transformers' SamHQModel, random weights.

- the HQ mask decoder at ViT-B's real geometry (64 x 64 tokens, 768-wide early features), on random image
  embeddings, every prompt kind, hints, multimask on and off, ``hq_token_only``: the fast path (which the predictor
  runs) in every case; the plain reference model at a 256 x 256 input (MLX's convs make it slow on the CPU);
- the whole predictor on a photo, from a ``.pth`` file: a small ViT (HQ-SAM's ViT-B/L/H differ only in the
  encoder's widths and depths, checked by the ViT parity tests) and Light HQ-SAM's TinyViT;
- a ``save_pretrained`` SamHQModel file, whose multimask output is the three SAM masks sorted by IoU, each plus
  the HQ mask: sam_mlx's (and the original's) one mask is its first.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import sam_mlx
from helpers import IMAGES, gpu_branches
from reference import build_reference_hq_sam, predictor_pair, randomize_transformers_sam, reference_hq_predictor_class
from sam_mlx.config import SamConfig
from sam_mlx.fast import FastSam
from sam_mlx.fast.hq_mask_decoder import hq_features
from sam_mlx.transforms import ImageGeometry, image_geometry, preprocess

PROMPTS = {
    "point": dict(point_coords=[[500, 375]], point_labels=[1]),
    "points_fg_bg": dict(point_coords=[[500, 375], [1125, 625], [1500, 800]], point_labels=[1, 1, 0]),
    "box_and_points": dict(box=[425, 600, 700, 875], point_coords=[[575, 750], [560, 700]], point_labels=[0, 1]),
}


def _np(prompt: dict) -> dict:
    return {k: np.array(v) for k, v in prompt.items()}


# ---------------------------------------------------------------- the decoder at ViT-B's geometry
@pytest.fixture(scope="module")
def vit_b_decoder(tmp_path_factory):
    """The original HQ-SAM ViT-B's prompt encoder and HQ decoder, sam_mlx's model loaded from its ``.pth``,
    random image embeddings and early features, as the decoder sees them, and the fast path's image."""
    ref = build_reference_hq_sam("vit", seed=3)
    path = tmp_path_factory.mktemp("hq_vit_b") / "sam_hq_vit_b.pth"
    torch.save(ref.state_dict(), path)
    rng = np.random.default_rng(0)
    tokens = rng.normal(0, 0.5, (1, 64, 64, 256)).astype(np.float32)
    early = rng.normal(0, 1.0, (1, 64, 64, 768)).astype(np.float32)
    ours = sam_mlx.load(str(path))
    fast = FastSam(ours)
    frame = ImageGeometry((1024, 1024), (1024, 1024), (1024, 1024))  # prompts in the encoder input's pixels
    image = fast.prepare(mx.array(tokens), frame, hq_features(ours.mask_decoder, mx.array(tokens), mx.array(early)))
    return ref, ours, tokens, early, fast, image


# Two prompts of each kind, encoder-input pixels; the hint is random low-res logits.
COORDS = np.array([[[500.0, 375.0], [812.5, 300.25]], [[100.0, 900.0], [640.0, 64.0]]], np.float32)
LABELS = np.array([[1, 0], [1, 1]], np.int64)
BOXES = np.array([[425, 600, 700, 875], [10, 20, 1000, 500]], np.float32)
HINT = np.random.default_rng(1).normal(0, 3, (2, 256, 256)).astype(np.float32)


def _prompts(kind: str) -> tuple:
    """(points, boxes, hint) as numpy, None for those the kind has not."""
    return ((COORDS, LABELS) if kind != "box" else None, BOXES if kind != "points" else None,
            HINT if kind == "box_points_hint" else None)


def _reference_decode(vit_b_decoder, kind, multimask, hq_token_only):
    ref, _, tokens, early = vit_b_decoder[:4]
    points, boxes, hint = _prompts(kind)
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(
            points=None if points is None else tuple(torch.from_numpy(a) for a in points),
            boxes=None if boxes is None else torch.from_numpy(boxes),
            masks=None if hint is None else torch.from_numpy(hint[:, None]))
        logits, iou = ref.mask_decoder(
            image_embeddings=torch.from_numpy(tokens).permute(0, 3, 1, 2), image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
            hq_token_only=hq_token_only, interm_embeddings=[torch.from_numpy(early)],
        )
    return logits.numpy(), iou.numpy()


def _mx_prompts(kind: str) -> tuple:
    points, boxes, hint = _prompts(kind)
    return (None if points is None else (mx.array(points[0]), mx.array(points[1].astype(np.int32))),
            None if boxes is None else mx.array(boxes), None if hint is None else mx.array(hint))


@pytest.mark.parametrize("prompt, multimask, hq_token_only", [
    ("points", True, False), ("points", False, True), ("box", True, True), ("box", False, False),
    ("box_points_hint", True, False), ("box_points_hint", False, True),
])
def test_vit_b_decoder(vit_b_decoder, prompt, multimask, hq_token_only):
    """The fast path (what the predictor runs)."""
    expected = _reference_decode(vit_b_decoder, prompt, multimask, hq_token_only)
    fast, image = vit_b_decoder[4:]
    logits, iou = fast.decode(image, *_mx_prompts(prompt), multimask, hq_token_only=hq_token_only)
    assert logits.shape == expected[0].shape == (2, 1, 256, 256)
    assert np.abs(logits - expected[0]).max() <= 1e-3
    assert np.abs(iou - expected[1]).max() <= 1e-4


def test_plain_decoder(tmp_path):
    """The plain reference model (MLX's convs, slow on the CPU: at a 256 x 256 input, 16 x 16 tokens) against the
    original and the fast path."""
    ref = build_reference_hq_sam("vit", seed=4, image_size=256, embed_dim=64, depth=2, num_heads=2,
                                 global_attn_indexes=(1,), window_size=14)
    torch.save(ref.state_dict(), tmp_path / "sam_hq.pth")
    ours = sam_mlx.load(str(tmp_path / "sam_hq.pth"))
    rng = np.random.default_rng(2)
    tokens = rng.normal(0, 0.5, (1, 16, 16, 256)).astype(np.float32)
    early = rng.normal(0, 1.0, (1, 16, 16, 64)).astype(np.float32)
    points = np.array([[[100.0, 75.0], [200.5, 30.25]]], np.float32), np.array([[1, 0]])
    box, hint = np.array([[40, 60, 170, 200]], np.float32), rng.normal(0, 3, (1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        sparse, dense = ref.prompt_encoder(points=tuple(torch.from_numpy(a) for a in points),
                                           boxes=torch.from_numpy(box), masks=torch.from_numpy(hint[:, None]))
        expected = ref.mask_decoder(
            image_embeddings=torch.from_numpy(tokens).permute(0, 3, 1, 2), image_pe=ref.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            hq_token_only=False, interm_embeddings=[torch.from_numpy(early)],
        )
    features = ours.mask_decoder.hq_features(mx.array(tokens), mx.array(early))
    assert np.abs(np.array(features) - np.array(hq_features(ours.mask_decoder, mx.array(tokens),
                                                               mx.array(early)))).max() <= 1e-4  # the fast path's
    prompts = ((mx.array(points[0]), mx.array(points[1].astype(np.int32))), mx.array(box), mx.array(hint))
    logits, iou = ours.decode(mx.array(tokens), (256, 256), *prompts, True, features)
    assert logits.shape == tuple(expected[0].shape) == (1, 1, 64, 64)
    assert np.abs(np.array(logits) - expected[0].numpy()).max() <= 1e-3
    assert np.abs(np.array(iou) - expected[1].numpy()).max() <= 1e-4


def test_vit_b_config(vit_b_decoder):
    config = vit_b_decoder[1].config
    assert config.hq and config.name == "hq_vit_b" and config.early_feature_dim == 768
    assert SamConfig.from_dict(config.to_dict()) == config
    assert "hq" not in SamConfig().to_dict()  # a plain SAM's config, and so its fingerprint, as before HQ-SAM
    with pytest.raises(ValueError, match=r"SamConfig\.hq"):
        SamConfig.from_dict({**config.to_dict(), "hq": "yes"})


@pytest.mark.parametrize("key", ["mask_decoder.compress_vit_feat.0.weight", "mask_decoder.hf_mlp.layers.2.bias",
                                 "mask_decoder.embedding_maskfeature.1.weight"])
def test_missing_hq_weight_is_named(tmp_path, key):
    state = build_reference_hq_sam("vit", image_size=256, embed_dim=32, depth=2, num_heads=2,
                                   global_attn_indexes=(1,)).state_dict()
    del state[key]
    torch.save(state, tmp_path / "sam_hq.pth")
    with pytest.raises(sam_mlx.CheckpointError, match=key.replace(".", r"\.")):
        sam_mlx.load(str(tmp_path / "sam_hq.pth"))


# ---------------------------------------------------------------- the predictor on a photo
# A small ViT (9 x 9 windows, the first global-attention block third) and Light HQ-SAM's TinyViT.
ENCODERS = {
    "vit": dict(encoder="vit", embed_dim=128, depth=6, num_heads=4, global_attn_indexes=(2, 5), window_size=9),
    "tiny_vit": dict(encoder="tiny_vit"),
}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def predictors(request, tmp_path_factory):
    ref_model = build_reference_hq_sam(seed=1, **ENCODERS[request.param])
    path = tmp_path_factory.mktemp(request.param) / "sam_hq.pth"
    ref, ours = predictor_pair(ref_model, reference_hq_predictor_class(), path)
    return request.param, ref, ours


def test_predictor_embedding(predictors):
    name, ref, ours = predictors
    assert ours.model.config.name == f"hq_{'vit_custom' if name == 'vit' else 'tiny_vit'}"
    assert np.abs(ours.get_image_embedding() - ref.features.numpy()).max() <= 1e-3


@pytest.mark.parametrize("prompt, multimask, hq_token_only", [
    *((prompt, multimask, False) for prompt in sorted(PROMPTS) for multimask in (True, False)),
    ("box_and_points", True, True),
])
def test_predictor_outputs(predictors, prompt, multimask, hq_token_only):
    _, ref, ours = predictors
    kwargs = dict(_np(PROMPTS[prompt]), multimask_output=multimask, hq_token_only=hq_token_only)
    with torch.no_grad():
        ref_masks, ref_iou, ref_low = ref.predict(**kwargs)
    masks, iou, low = ours.predict(**kwargs)
    assert masks.shape == ref_masks.shape == (1, 1200, 1800) and masks.dtype == bool
    assert np.abs(low - ref_low).max() <= 1e-3
    assert np.abs(iou - ref_iou).max() <= 1e-4
    assert (masks == ref_masks).mean() >= 0.999


def test_predictor_mask_input_and_batch(predictors):
    _, ref, ours = predictors
    prompt = _np(PROMPTS["point"])
    with torch.no_grad():
        _, _, ref_low = ref.predict(**prompt)
        ref_masks, ref_iou, ref_low2 = ref.predict(**prompt, mask_input=ref_low)
    masks, iou, low = ours.predict(**prompt, mask_input=ref_low)
    assert np.abs(low - ref_low2).max() <= 1e-3 and np.abs(iou - ref_iou).max() <= 1e-4
    # a batch of two boxes: each as alone (no padding involved)
    boxes = np.array([[425, 600, 700, 875], [75, 275, 1725, 850]])
    batch_masks, batch_iou, _ = ours.predict_batch(boxes=boxes, multimask_output=False)
    assert batch_masks.shape == (2, 1, 1200, 1800)
    for i, box in enumerate(boxes):
        with torch.no_grad():
            one_masks, one_iou, _ = ref.predict(box=box, multimask_output=False)
        assert np.abs(batch_iou[i] - one_iou).max() <= 1e-4 and (batch_masks[i] == one_masks).mean() >= 0.999


def test_gpu_branches(predictors):
    """The branches an Apple GPU takes (``helpers.gpu_branches``), on the CPU device, equal the CPU's."""
    _, _, ours = predictors
    kwargs = dict(_np(PROMPTS["box_and_points"]), mask_input=None)
    masks, iou, low = ours.predict(**kwargs)
    image = np.asarray(Image.open(IMAGES / "truck.jpg").convert("RGB"))
    with gpu_branches():
        gpu = sam_mlx.SamPredictor(ours.model)
        gpu.set_image(image)
        assert np.abs(gpu.get_image_embedding() - ours.get_image_embedding()).max() <= 1e-4
        gpu_masks, gpu_iou, gpu_low = gpu.predict(**kwargs)
        batch = gpu.predict_batch(boxes=np.array([[425, 600, 700, 875], [75, 275, 1725, 850]]), hq_token_only=True)
    assert np.abs(gpu_low - low).max() <= 1e-3 and np.abs(gpu_iou - iou).max() <= 1e-4
    assert (gpu_masks == masks).mean() >= 0.999
    cpu_batch = ours.predict_batch(boxes=np.array([[425, 600, 700, 875], [75, 275, 1725, 850]]), hq_token_only=True)
    assert np.abs(batch[2] - cpu_batch[2]).max() <= 1e-3 and np.abs(batch[1] - cpu_batch[1]).max() <= 1e-4


def test_tokens_alone_are_refused(predictors, tmp_path):
    _, _, ours = predictors
    with pytest.raises(ValueError, match="early features"):
        ours.set_image_tokens(ours.features, ours.geometry)
    with pytest.raises(ValueError, match="early features"):
        sam_mlx.save_image_tokens(ours, tmp_path / "tokens.safetensors")
    assert not (tmp_path / "tokens.safetensors").exists()


# ---------------------------------------------------------------- transformers' SamHQModel
# transformers' SamHQMaskDecoder.forward (5.24) upscales the image tokens as they were before the two-way transformer
# (and with rows and columns swapped) where the original upscales the transformer's output, so its masks are not
# the original's. The file's weights are checked against its modules composed as the original composes them.
def _random_hf_hq(tmp_path):
    torch.manual_seed(0)
    vision = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, global_attn_indexes=[1, 3],
                  window_size=14, image_size=256)  # 16 x 16 tokens
    config = transformers.SamHQConfig(vision_config=vision, mask_decoder_config=dict(vit_dim=96),
                                      prompt_encoder_config=dict(image_size=256, image_embedding_size=16))
    hf = randomize_transformers_sam(transformers.SamHQModel(config))
    hf.save_pretrained(tmp_path)
    return hf


def _hf_hq_decode(hf, embedding, early, points, labels, box, multimask, hq_token_only):
    """(low-res logits, IoU) of one prompt as the original HQ-SAM computes them, from transformers' modules."""
    d = hf.mask_decoder
    sparse, dense = hf.prompt_encoder(input_points=points, input_labels=labels, input_boxes=box, input_masks=None)
    tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight, d.hq_token.weight])[None, None]
    tokens, image = d.transformer(point_embeddings=torch.cat([tokens, sparse], dim=2),
                                  image_embeddings=embedding + dense, attention_similarity=None,
                                  image_positional_embeddings=hf.get_image_wide_positional_embeddings())
    image = image[0].transpose(1, 2).reshape(embedding.shape)
    features = d.activation(d.upscale_conv2(d.activation(d.upscale_layer_norm(d.upscale_conv1(image)))))
    hq_features = (d.encoder_conv2(d.activation(d.encoder_norm(d.encoder_conv1(embedding))))
                   + d.compress_vit_conv2(d.activation(d.compress_vit_norm(d.compress_vit_conv1(early)))))
    hq_pixels = d.mask_conv2(d.activation(d.mask_norm(d.mask_conv1(features)))) + hq_features
    tokens = tokens[0]
    sam_masks = torch.stack([mlp(tokens[:, 1 + i]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], 1)
    size = features.shape[-2:]
    sam_masks = (sam_masks @ features.flatten(2)).reshape(1, -1, *size)
    hq_mask = (d.hq_mask_mlp(tokens[:, 5])[:, None] @ hq_pixels.flatten(2)).reshape(1, 1, *size)
    iou = d.iou_prediction_head(tokens[:, 0])
    best = int(iou[0, 1:].argmax()) + 1 if multimask else 0
    masks = hq_mask if hq_token_only else sam_masks[:, best : best + 1] + hq_mask
    return masks.numpy(), iou[:, best : best + 1].numpy()


def test_transformers_sam_hq(tmp_path):
    hf = _random_hf_hq(tmp_path)
    ours = sam_mlx.load(str(tmp_path / "model.safetensors"))
    assert ours.config.hq and ours.config.encoder.embed_dim == 96

    image = np.asarray(Image.open(IMAGES / "dog.jpg").convert("RGB"))
    pixels = preprocess(image, image_geometry(image.shape[:2], "original", 256))
    fast = FastSam(ours)
    tokens, features = fast.encode_hq(pixels)
    encoded = fast.prepare(tokens, ImageGeometry((256, 256), (256, 256), (256, 256)), features)
    with torch.no_grad():
        vision = hf.vision_encoder(torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2))
    embedding, early = vision.last_hidden_state, vision.intermediate_embeddings[0].permute(0, 3, 1, 2)
    assert np.abs(np.array(tokens).transpose(0, 3, 1, 2) - embedding.numpy()).max() <= 1e-3

    points = np.array([[[128.0, 75.0], [175.5, 105.25]]], np.float32)
    labels = np.array([[1, 0]])
    box = np.array([[75.0, 30.0, 190.0, 160.0]], np.float32)
    for multimask in (True, False):
        for hq_token_only in (False, True):
            with torch.no_grad():
                expected = _hf_hq_decode(hf, embedding, early, torch.from_numpy(points)[None],
                                         torch.from_numpy(labels)[None], torch.from_numpy(box)[None], multimask,
                                         hq_token_only)
                out = hf(image_embeddings=embedding, intermediate_embeddings=vision.intermediate_embeddings,
                         input_points=torch.from_numpy(points)[None], input_labels=torch.from_numpy(labels)[None],
                         input_boxes=torch.from_numpy(box)[None], multimask_output=multimask)
            prompts = ((mx.array(points), mx.array(labels.astype(np.int32))), mx.array(box))
            logits, iou = fast.decode(encoded, *prompts, None, multimask, hq_token_only=hq_token_only)
            assert logits.shape == expected[0].shape == (1, 1, 64, 64)
            assert np.abs(logits - expected[0]).max() <= 1e-3
            assert np.abs(iou - expected[1]).max() <= 1e-4
            # transformers' own forward: the same IoU predictions (its best first)
            assert np.abs(np.array(iou) - out.iou_scores[0, :, :1].numpy()).max() <= 1e-4
