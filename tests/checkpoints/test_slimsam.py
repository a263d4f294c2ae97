"""SlimSAM's pruned ViT-B widths vs transformers' SamModel, random weights shaped as its published configs.

SlimSAM (nielsr/slimsam-50-uniform, nielsr/slimsam-77-uniform) is a ViT-B with 12 blocks and 12 heads whose
widths were pruned: hidden 384 / MLP 1536 (50 %) and hidden 168 / MLP 696 (77 %, 14-wide heads); its
config.json sets only those two. The weights here have those shapes at a 256 x 256 input (a 16 x 16 token grid,
padded to 28 x 28 for the 14 x 14 windows), so the test stays quick while the widths are SlimSAM's.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import sam_mlx
from helpers import IMAGES
from reference import randomize_transformers_sam
from sam_mlx.transforms import image_geometry, preprocess

SLIMSAM = {"slimsam-50": dict(hidden_size=384, mlp_dim=1536), "slimsam-77": dict(hidden_size=168, mlp_dim=696)}


@pytest.fixture(scope="module", params=sorted(SLIMSAM))
def models(request, tmp_path_factory):
    torch.manual_seed(0)
    vision = dict(SLIMSAM[request.param], image_size=256)
    config = transformers.SamConfig(vision_config=vision,
                                    prompt_encoder_config=dict(image_size=256, image_embedding_size=16))
    hf = randomize_transformers_sam(transformers.SamModel(config))
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, sam_mlx.load(str(folder / "model.safetensors"))


def test_config_inferred(models):
    name, _, ours = models
    enc = ours.config.encoder
    widths = SLIMSAM[name]
    assert (enc.embed_dim, enc.mlp_dim, enc.num_heads, enc.depth) == (widths["hidden_size"], widths["mlp_dim"], 12, 12)
    assert enc.global_attention_blocks == (2, 5, 8, 11) and enc.window_size == 14
    assert ours.config.image_size == 256 and not ours.config.hq


def test_embedding_and_masks(models):
    _, hf, ours = models
    image = np.asarray(Image.open(IMAGES / "groceries.jpg").convert("RGB"))
    geometry = image_geometry(image.shape[:2], "original", 256)
    pixels = preprocess(image, geometry)
    tokens = ours.encode_image(pixels)
    with torch.no_grad():
        embedding = hf.get_image_embeddings(torch.from_numpy(np.array(pixels)).permute(0, 3, 1, 2))
    assert np.abs(np.array(tokens).transpose(0, 3, 1, 2) - embedding.numpy()).max() <= 1e-3

    points = np.array([[[128.0, 80.0], [40.5, 150.25]]], np.float32)
    labels = np.array([[1, 0]])
    box = np.array([[30.0, 20.0, 200.0, 160.0]], np.float32)
    for multimask in (True, False):
        with torch.no_grad():
            out = hf(image_embeddings=embedding, input_points=torch.from_numpy(points)[None],
                     input_labels=torch.from_numpy(labels)[None], input_boxes=torch.from_numpy(box)[None],
                     multimask_output=multimask)
        logits, iou = ours.decode(tokens, (256, 256), (mx.array(points), mx.array(labels.astype(np.int32))),
                                  mx.array(box), None, multimask)
        assert logits.shape == tuple(out.pred_masks[:, 0].shape) == (1, 3 if multimask else 1, 64, 64)
        assert np.abs(np.array(logits) - out.pred_masks[:, 0].numpy()).max() <= 1e-3
        assert np.abs(np.array(iou) - out.iou_scores[:, 0].numpy()).max() <= 1e-4


def test_predictor(models):
    """The predictor (the fast path) on the pruned widths: its masks are the plain model's."""
    _, _, ours = models
    predictor = sam_mlx.SamPredictor(ours)
    predictor.set_image(IMAGES / "groceries.jpg")
    masks, iou, low_res = predictor.predict(point_coords=np.array([[500, 300]]), point_labels=np.array([1]))
    assert masks.shape[0] == 3 and masks.dtype == bool
    geometry = predictor.geometry
    point = mx.array(geometry.to_input_coords(np.array([[[500.0, 300.0]]])), dtype=mx.float32)
    plain_logits, plain_iou = ours.decode(ours.encode_image(preprocess(
        np.asarray(Image.open(IMAGES / "groceries.jpg").convert("RGB")), geometry)), geometry.padded_size,
        (point, mx.ones((1, 1), mx.int32)))
    assert np.abs(low_res - np.array(plain_logits)[0]).max() <= 1e-3
    assert np.abs(iou - np.array(plain_iou)[0]).max() <= 1e-4
