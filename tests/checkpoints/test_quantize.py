"""Quantized image encoders (``load(..., quantize=8|4)``): their layout, files, fingerprints, fast path and drift."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, best_mask_ious, gpu_branches, shared_prompt_outputs
from reference import build_reference_sam
from sam_mlx import cli
from sam_mlx.checkpoints.errors import CheckpointError
from sam_mlx.fast import FastSam
from sam_mlx.io.tokens import model_fingerprint, model_identity
from sam_mlx.transforms import image_geometry, preprocess


def encoder_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.image_encoder.parameters()))


@pytest.fixture(scope="module")
def models() -> dict:
    return {bits: sam_mlx.load(str(MOBILE_SAM), quantize=bits) for bits in (None, 8, 4)}


def test_every_encoder_linear_is_quantized_with_its_group_size(models):
    for bits in (8, 4):
        encoder = models[bits].image_encoder
        layers = [m for _, m in encoder.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
        assert layers and all(isinstance(m, nn.QuantizedLinear) and m.bits == bits for m in layers)
        # TinyViT's 160-wide stage takes groups of 32; every other width groups of 64
        assert {m.group_size for m in layers} == {32, 64}
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in models[bits].mask_decoder.named_modules())
        assert models[bits].config.encoder_bits == bits and f" q{bits} [" in model_identity(models[bits])
    # MobileSAM's encoder is 1/4 convolutions: float32 23 MB, 8 bits 9.6 MB, 4 bits 7.3 MB
    assert encoder_bytes(models[4]) < encoder_bytes(models[8]) < 0.5 * encoder_bytes(models[None])


def test_quantized_models_have_their_own_fingerprints(models):
    fingerprints = {bits: model_fingerprint(model) for bits, model in models.items()}
    assert len(set(fingerprints.values())) == 3


def test_a_quantized_model_saves_and_loads_back(models, tmp_path):
    path = sam_mlx.save_model(models[8], tmp_path / "q8.safetensors")
    loaded = sam_mlx.load(str(path))
    assert loaded.config == models[8].config and loaded.config.encoder_bits == 8
    ours, theirs = dict(tree_flatten(loaded.parameters())), dict(tree_flatten(models[8].parameters()))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    assert model_fingerprint(loaded) == model_fingerprint(models[8])
    assert sam_mlx.load(str(path), quantize=8).config.encoder_bits == 8  # already 8 bits: as it is
    with pytest.raises(CheckpointError, match="already quantized to 8 bits; it cannot be quantized to 4"):
        sam_mlx.load(str(path), quantize=4)
    half = mx.load(str(sam_mlx.save_model(models[8], tmp_path / "q8h.safetensors", dtype="float16")))
    assert {v.dtype for v in half.values()} == {mx.float16, mx.uint32}  # the packed weights kept as they are


def test_quantize_must_be_8_or_4_bits():
    with pytest.raises(ValueError, match="quantize must be 8 or 4 bits, got 3"):
        sam_mlx.load(str(MOBILE_SAM), quantize=3)


def test_a_packed_weight_of_the_wrong_type_is_refused(models, tmp_path):
    path = sam_mlx.save_model(models[8], tmp_path / "q8.safetensors")
    arrays, metadata = mx.load(str(path), return_metadata=True)
    name = next(k for k, v in arrays.items() if v.dtype == mx.uint32)
    arrays[name] = arrays[name].astype(mx.float32)
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    with pytest.raises(CheckpointError, match=f"quantized weight {name} holds float32 values, expected uint32"):
        sam_mlx.load(str(path))


def test_the_fast_path_computes_a_quantized_vit_as_the_plain_model(tmp_path):
    """The fast encoder dequantizes on the CPU and calls ``quantized_matmul`` on the GPU branches; the plain
    model always calls it: the same tokens."""
    path = tmp_path / "vit.pth"
    torch.save(build_reference_sam(embed_dim=128, depth=4, num_heads=4, global_attn_indexes=(1, 3), window_size=7,
                                   seed=1).state_dict(), path)
    model = sam_mlx.load(str(path), quantize=4)
    image = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    pixels = preprocess(image, image_geometry(image.shape[:2], "stretch", 256))
    plain = np.array(model.encode_image(pixels))
    fast = np.array(FastSam(model).encode(pixels))
    with gpu_branches():
        gpu = np.array(FastSam(model).encode(pixels))
    scale = np.abs(plain).max()
    np.testing.assert_allclose(fast, plain, atol=1e-4 * scale)
    np.testing.assert_allclose(gpu, plain, atol=1e-4 * scale)


def test_eight_bits_keep_mobile_sams_masks(models):
    """MobileSAM's real weights on dog.jpg's shared prompts: 8 bits against float32 (measured: tokens within 7e-3
    of a largest 0.6, scores within 8e-3, best masks' IoU >= 0.99; ``scripts/quantization.py`` for every photo)."""
    full, eight = (shared_prompt_outputs(models[bits], "dog") for bits in (None, 8))
    assert np.abs(eight["tokens"] - full["tokens"]).max() <= 2e-2
    for key in (k for k in full if k != "tokens"):
        assert np.abs(eight[key][1] - full[key][1]).max() <= 1e-2, key
    assert min(best_mask_ious(full, eight).values()) >= 0.97


def test_segment_everything_with_a_quantized_model(models):
    generator = sam_mlx.SamAutomaticMaskGenerator(models[8], points_per_side=4, sizing="stretch", size=512)
    records = generator.generate(str(IMAGES / "dog.jpg"))
    assert records and all(r["segmentation"].shape == (534, 800) for r in records)


def test_the_command_converts_and_segments_quantized(models, tmp_path):
    """``convert --quantize 8`` writes a file that loads back as the 8-bit model; ``segment --quantize 8`` and the
    converted file give the same scores."""
    out = tmp_path / "mobile_sam_q8.safetensors"
    assert cli.main(["convert", str(MOBILE_SAM), "--out", str(out), "--quantize", "8"]) == 0
    assert model_fingerprint(sam_mlx.load(str(out))) == model_fingerprint(models[8])
    scores = []
    for model, extra in ((str(MOBILE_SAM), ["--quantize", "8"]), (str(out), [])):
        folder = tmp_path / f"run{len(scores)}"
        args = ["segment", str(IMAGES / "dog.jpg"), "--model", model, "--point", "400,300", "--out-dir", str(folder),
                "--sizing", "stretch", "--size", "512", *extra]
        assert cli.main(args) == 0
        scores.append(json.loads(next(folder.glob("*.json")).read_text()))
    assert scores[0]["masks"] and [m["score"] for m in scores[0]["masks"]] == [m["score"] for m in scores[1]["masks"]]


def test_weights_are_quantized_as_they_are_read(tmp_path):
    """Loading a float32 file with quantize=8 never holds the float32 encoder: the peak is the quantized model plus
    about one float32 tensor (random ViT-H measured: 0.76 GB of weights, 3.3 GB peak before, ~0.8 GB after)."""
    path = tmp_path / "vit.pth"
    torch.save(build_reference_sam(embed_dim=256, depth=4, num_heads=4, global_attn_indexes=(1, 3)).state_dict(), path)
    sam_mlx.load(str(path), quantize=8)  # once first: the first load in a process allocates ~20 MB once
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = sam_mlx.load(str(path), quantize=8)
    peak = mx.get_peak_memory() - before
    params = tree_flatten(model.parameters())
    loaded, largest = sum(v.nbytes for _, v in params), 4 * max(v.size for _, v in params)
    float32 = sum(v.size for _, v in tree_flatten(sam_mlx.load(str(path)).parameters())) * 4
    assert loaded + 2 * largest < float32  # the bound below tells the two apart
    assert peak <= loaded + 2 * largest, (peak, loaded, largest)
