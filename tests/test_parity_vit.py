"""SAM with a ViT encoder vs Meta's original PyTorch code, random weights, a real photo.

The reference is a Meta ``Sam`` with random weights saved as a real ``.pth`` file;
sam_mlx loads that file (without torch) and both predictors run the same prompts.
"""

import numpy as np
import pytest
import torch

from reference import build_reference_sam, predictor_pair, reference_predictor_class

CONFIGS = {
    # ViT-B shape: 64x64 grid, 14x14 windows (the grid needs padding to 70).
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11), window_size=14),
    # A small custom shape with 9x9 windows (64 -> 72 padding) and 2 global blocks.
    "custom": dict(embed_dim=128, depth=6, num_heads=4, global_attn_indexes=(2, 5), window_size=9),
}

PROMPTS = {
    "point": dict(point_coords=[[500, 375]], point_labels=[1]),
    "points_fg_bg": dict(point_coords=[[500, 375], [1125, 625], [1500, 800]], point_labels=[1, 1, 0]),
    "box": dict(box=[425, 600, 700, 875]),
    "box_and_points": dict(box=[425, 600, 700, 875], point_coords=[[575, 750], [560, 700]], point_labels=[0, 1]),
    # label -1: a padding point (its position is ignored), as in prompts padded to a common point count
    "points_padded": dict(point_coords=[[500, 375], [0, 0], [0, 0]], point_labels=[1, -1, -1]),
}


def _np(prompt: dict) -> dict:
    return {k: np.array(v) for k, v in prompt.items()}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def predictors(request, tmp_path_factory):
    ref_model = build_reference_sam(**CONFIGS[request.param], seed=1)
    path = tmp_path_factory.mktemp(request.param) / "sam_random.pth"
    ref, ours = predictor_pair(ref_model, reference_predictor_class(), path)
    return request.param, ref, ours


def _reference_predict(ref, **kwargs):
    with torch.no_grad():
        return ref.predict(**kwargs)


def test_config_inferred(predictors):
    name, _, ours = predictors
    cfg = ours.model.config.encoder
    expected = CONFIGS[name]
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads) == tuple(expected[k] for k in ("embed_dim", "depth", "num_heads"))
    assert cfg.global_attention_blocks == expected["global_attn_indexes"]
    assert cfg.window_size == expected["window_size"]


def test_image_embedding(predictors):
    _, ref, ours = predictors
    expected = ref.get_image_embedding().numpy()
    got = ours.get_image_embedding()
    assert got.shape == expected.shape == (1, 256, 64, 64)
    assert np.abs(got - expected).max() <= 1e-3
    assert ours.input_size == tuple(ref.input_size)


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_prompt_outputs(predictors, prompt, multimask):
    _, ref, ours = predictors
    kwargs = dict(_np(PROMPTS[prompt]), multimask_output=multimask)
    ref_masks, ref_iou, ref_low = _reference_predict(ref, **kwargs)
    masks, iou, low = ours.predict(**kwargs)
    assert masks.shape == ref_masks.shape == ((3 if multimask else 1), 1200, 1800)
    assert masks.dtype == bool
    assert np.abs(low - ref_low).max() <= 1e-3
    assert np.abs(iou - ref_iou).max() <= 1e-4
    assert (masks == ref_masks).mean() >= 0.999


@pytest.mark.parametrize("multimask", [True, False])
def test_mask_input(predictors, multimask):
    _, ref, ours = predictors
    prompt = _np(PROMPTS["point"])
    _, ref_iou, ref_low = _reference_predict(ref, **prompt)
    hint = ref_low[np.argmax(ref_iou)][None]
    kwargs = dict(prompt, mask_input=hint, multimask_output=multimask)
    ref_masks, ref_iou2, ref_low2 = _reference_predict(ref, **kwargs)
    masks, iou, low = ours.predict(**kwargs)
    assert np.abs(low - ref_low2).max() <= 1e-3
    assert np.abs(iou - ref_iou2).max() <= 1e-4
    assert (masks == ref_masks).mean() >= 0.999


def test_return_logits(predictors):
    _, ref, ours = predictors
    kwargs = dict(_np(PROMPTS["box"]), return_logits=True)
    ref_logits, _, _ = _reference_predict(ref, **kwargs)
    logits, _, _ = ours.predict(**kwargs)
    assert logits.dtype == np.float32
    assert np.abs(logits - ref_logits).max() <= 1e-3
