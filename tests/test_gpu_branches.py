"""The code an Apple GPU runs, checked here on the CPU device.

On a GPU sam_mlx's fast path takes other branches than on the CPU (``ops.backend.on_cpu``): MLX's fused
attention kernel with the relative-position term as its mask, MLX's LayerNorm and softmax, one band of image
tokens, a batch's prompts decoded together, and a half-precision image encoder by default. CI has no
Apple GPU, so these tests take the GPU branches on the CPU device (``helpers.gpu_branches``) and compare
them with the CPU branches, which the parity tests check against the original. What they cannot check is
Metal's own kernels, nor any speed.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, PHOTOS, best_mask_ious, gpu_branches, shared_prompt_outputs
from reference import build_reference_sam
from sam_mlx.ops import backend

HALF_PRECISION_PHOTOS = ("groceries",)  # a float16 encoding takes ~25 s on the CPU; bfloat16 did worst here


def encoder_dtypes(model) -> set:
    return {v.dtype for _, v in tree_flatten(model.image_encoder.parameters())}


@pytest.fixture(scope="module")
def mobile_sam_runs() -> dict:
    """The shared prompts through the CPU branches, the GPU branches in float32, and the GPU branches
    with the model as a GPU loads it by default."""
    model = sam_mlx.load(str(MOBILE_SAM))
    runs = {"cpu": {p: shared_prompt_outputs(model, p) for p in PHOTOS}}
    with gpu_branches():
        assert not backend.on_cpu()  # the patch bites
        runs["gpu"] = {p: shared_prompt_outputs(model, p) for p in PHOTOS}
        default = sam_mlx.load(str(MOBILE_SAM))
        runs["gpu_default_dtypes"] = encoder_dtypes(default)
        runs["gpu_default"] = {p: shared_prompt_outputs(default, p) for p in HALF_PRECISION_PHOTOS}
    assert backend.on_cpu()  # and is undone
    return runs


@pytest.mark.parametrize("photo", PHOTOS)
def test_gpu_branches_equal_the_cpu_branches(mobile_sam_runs, photo):
    cpu, gpu = mobile_sam_runs["cpu"][photo], mobile_sam_runs["gpu"][photo]
    assert cpu.keys() == gpu.keys()
    np.testing.assert_allclose(gpu["tokens"], cpu["tokens"], atol=1e-5)  # measured <= 1e-6
    for key in (k for k in cpu if k != "tokens"):
        (masks, scores, low), (gpu_masks, gpu_scores, gpu_low) = cpu[key], gpu[key]
        np.testing.assert_allclose(gpu_low, low, atol=1e-3, err_msg=str(key))  # measured <= 3e-4
        np.testing.assert_allclose(gpu_scores, scores, atol=1e-4, err_msg=str(key))  # measured <= 6e-6
        assert (gpu_masks == masks).mean() >= 0.999, key


def test_gpu_default_encoder_precision_is_float16_for_tiny_vit(mobile_sam_runs):
    assert mobile_sam_runs["gpu_default_dtypes"] == {mx.float16}


@pytest.mark.parametrize("photo", HALF_PRECISION_PHOTOS)
def test_gpu_default_precision_keeps_the_masks(mobile_sam_runs, photo):
    """MobileSAM as a GPU loads it (float16 TinyViT) against float32, both on the GPU branches.

    Measured (``scripts/precision.py --gpu-branches``): image tokens within 6e-3, scores within 5e-3,
    the best masks' IoU >= 0.99; with a bfloat16 encoder 6e-2, 3e-2 and 0.97.
    """
    full, half = mobile_sam_runs["gpu"][photo], mobile_sam_runs["gpu_default"][photo]
    assert np.abs(half["tokens"] - full["tokens"]).max() <= 1e-2
    for key in (k for k in full if k != "tokens"):
        assert np.abs(half[key][1] - full[key][1]).max() <= 1e-2, key
    ious = best_mask_ious(full, half)
    assert ious.keys() == {k[0] for k in full if k != "tokens"}  # every shared prompt and the batch
    assert min(ious.values()) >= 0.98, ious


@pytest.mark.parametrize("sizing, size", [("original", 1024), ("stretch", 512)])
def test_gpu_branches_equal_the_cpu_branches_with_a_vit(tmp_path, monkeypatch, sizing, size):
    """A small random-weight ViT (9 x 9 windows, 2 global blocks): the fused attention kernel with the
    decomposed relative-position term as its mask, on a square and on a non-square token grid;
    and its default precision on a GPU with native bfloat16 (an M3, as MLX reports it), bfloat16."""
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": "applegpu_g15s"})
    torch_model = build_reference_sam(embed_dim=128, depth=6, num_heads=4, global_attn_indexes=(2, 5),
                                      window_size=9, seed=3)
    path = tmp_path / "vit.pth"
    torch.save(torch_model.state_dict(), path)
    model = sam_mlx.load(str(path))
    prompt = dict(point_coords=np.array([[500.0, 375.0]]), point_labels=np.array([1]))

    def run() -> tuple:
        predictor = sam_mlx.SamPredictor(model, sizing=sizing, size=size)
        predictor.set_image(str(IMAGES / "truck.jpg"))
        return predictor.get_image_embedding(), *predictor.predict(**prompt)

    (tokens, masks, scores, low), cpu_dtypes = run(), encoder_dtypes(model)
    with gpu_branches():
        gpu_tokens, gpu_masks, gpu_scores, gpu_low = run()
        gpu_dtypes = encoder_dtypes(sam_mlx.load(str(path)))
    np.testing.assert_allclose(gpu_tokens, tokens, atol=1e-5 * np.abs(tokens).max())
    np.testing.assert_allclose(gpu_low, low, atol=1e-3)
    np.testing.assert_allclose(gpu_scores, scores, atol=1e-4)
    assert (gpu_masks == masks).mean() >= 0.999
    assert (cpu_dtypes, gpu_dtypes) == ({mx.float32}, {mx.bfloat16})


def test_tiny_vit_activations_stay_far_below_the_float16_limit(monkeypatch):
    """Why float16 is safe for TinyViT: every layer's output, in float32, on the shared photos, noise, black
    and white, stays under 1/16 of float16's largest value, 65504 (measured: ~900 at most, on noise).
    Measured through the fast path's layers (the plain model's are the same values, computed far slower)."""
    from sam_mlx.fast import FastSam
    from sam_mlx.fast import tiny_vit as fast_tiny_vit
    from sam_mlx.io.images import as_rgb_array
    from sam_mlx.transforms import image_geometry, preprocess

    largest = []

    def recorded(call):
        def record(*args):
            out = call(*args)
            largest.append(mx.abs(out).max())
            return out
        return record

    for name in ("_conv", "_mbconv", "_patch_merging", "_window_attention", "_tiny_vit_block"):
        monkeypatch.setattr(fast_tiny_vit, name, recorded(getattr(fast_tiny_vit, name)))
    monkeypatch.setattr(nn.Linear, "__call__", recorded(nn.Linear.__call__))
    model = FastSam(sam_mlx.load(str(MOBILE_SAM)))
    rng = np.random.default_rng(0)
    images = [as_rgb_array(str(IMAGES / f"{p}.jpg")) for p in PHOTOS] + [
        rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8), np.zeros((600, 800, 3), np.uint8),
        np.full((600, 800, 3), 255, np.uint8)]
    for image in images:
        largest.clear()
        tokens = model.encode(preprocess(image, image_geometry(image.shape[:2], "original", 1024)))
        peak = mx.max(mx.stack([tokens.abs().max(), *largest])).item()
        assert len(largest) > 50 and 100 < peak < 65504 / 16


def test_segment_everything_on_the_gpu_branches():
    """Segment everything (an 8 x 8 grid), whose batches a GPU decodes whole."""
    model = sam_mlx.load(str(MOBILE_SAM))

    def generate() -> list[dict]:
        generator = sam_mlx.SamAutomaticMaskGenerator(model, points_per_side=8, points_per_batch=32)
        return sorted(generator.generate(str(IMAGES / "dog.jpg")), key=lambda r: (r["crop_box"], r["point_coords"]))

    cpu = generate()
    with gpu_branches():
        gpu = generate()
    assert len(cpu) >= 10 and len(gpu) == len(cpu)
    for ours, theirs in zip(gpu, cpu):
        assert (ours["crop_box"], ours["point_coords"]) == (theirs["crop_box"], theirs["point_coords"])
        assert abs(ours["predicted_iou"] - theirs["predicted_iou"]) < 1e-4
        assert (ours["segmentation"] == theirs["segmentation"]).mean() >= 0.999
