"""The GPU path's memory and precision choices (issue 35), checked through the GPU branches on the CPU device.

``mx.get_peak_memory()`` counts MLX's allocations on the CPU as on a GPU, so the bounds that keep a Mac's
GPU within memory (the relative-position mask in chunks, prompts decoded in groups, weights cast one at a
time) are measured here; Metal's own kernels and speed are not (``scripts/device_check.py`` on a Mac).
"""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, gpu_branches
from reference import build_reference_sam
from sam_mlx import resources
from sam_mlx.checkpoints.load import default_encoder_dtype
from sam_mlx.config import SamConfig, TinyViTConfig, ViTConfig
from sam_mlx.fast import mask_decoder
from sam_mlx.ops import attention, elementwise


def peak_of(fn):
    """(fn(), evaluated; the peak of MLX's memory above what was allocated before, in bytes)."""
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    out = fn()
    mx.eval(out)
    return out, mx.get_peak_memory() - before


def test_relative_position_mask_is_built_in_chunks_of_queries_on_the_gpu(monkeypatch):
    """A global block's attention on a 48 x 48 grid (stretch sizing at 768): the whole-mask version peaks at
    twice the 81 MiB mask here (MLX's CPU kernel adds the logits; Metal's fused one does not); in 1 MiB chunks
    evaluated one after another, at ~11 MiB (measured: the peak grows with the chunk, not the grid), with the
    same result."""
    side, heads, dim = 48, 4, 16
    tokens = side * side
    mx.random.seed(0)
    q, k, v = (mx.random.normal((1, heads, tokens, dim)) for _ in range(3))
    bias_h, bias_w = mx.random.normal((1, heads, tokens, side)), mx.random.normal((1, heads, tokens, side))
    mx.eval(q, k, v, bias_h, bias_w)
    monkeypatch.setattr(attention, "GPU_MASK_BYTES", 1 << 20)

    def whole_mask():
        mask = (bias_h[..., :, None] + bias_w[..., None, :]).reshape(1, heads, tokens, tokens)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)

    full, full_peak = peak_of(whole_mask)
    with gpu_branches():
        chunked, chunked_peak = peak_of(lambda: attention.attention(q, k, v, 0.25, rel_pos=(bias_h, bias_w)))
    mask_bytes = heads * tokens * tokens * 4
    assert full_peak >= mask_bytes and chunked_peak < mask_bytes / 4, (full_peak, chunked_peak, mask_bytes)
    np.testing.assert_allclose(np.array(chunked), np.array(full), atol=1e-6)


def test_segment_everything_prompts_are_decoded_in_groups_bounded_by_memory():
    """64 grid points on dog.jpg through the GPU branches: measured ~1.8 GB decoded whole, ~0.3 GB in groups
    within ``_GPU_DECODE_BYTES``; the same logits and scores."""
    model = sam_mlx.load(str(MOBILE_SAM))
    with gpu_branches():
        generator = sam_mlx.SamAutomaticMaskGenerator(model, points_per_side=8, points_per_batch=64)
        image = np.array(sam_mlx.io.images.as_rgb_array(str(IMAGES / "dog.jpg")))
        geometry = sam_mlx.transforms.image_geometry(image.shape[:2], "original", 1024)
        encoded = generator._sam.encode_image(image, geometry)
        points = generator.point_grids[0] * np.array(image.shape[:2])[None, ::-1]
        prompts = (mx.array(geometry.to_input_coords(points[:, None, :])), mx.ones((len(points), 1), mx.int32))
        assert 1 < mask_decoder.prompt_group(encoded.grid_pe.shape) < 64

        def decode():
            return generator._sam.decode(encoded, prompts, None, None, multimask_output=True, read_grid_only=True)

        (low_res, iou), grouped_peak = peak_of(decode)
        budget = mask_decoder._GPU_DECODE_BYTES
        mask_decoder._GPU_DECODE_BYTES = 1 << 40
        try:
            (whole_low_res, whole_iou), whole_peak = peak_of(decode)
        finally:
            mask_decoder._GPU_DECODE_BYTES = budget
    assert grouped_peak < 1.5 * budget < whole_peak / 2, (grouped_peak, whole_peak)
    np.testing.assert_allclose(low_res, whole_low_res, atol=1e-4)
    np.testing.assert_allclose(iou, whole_iou, atol=1e-5)


def test_loading_casts_one_tensor_at_a_time(tmp_path):
    """Loaded as float16, a float32 checkpoint never has all its weights in float32 at once: the peak is the
    float16 model plus about one float32 tensor (before: the float32 model plus the float16 one)."""
    path = tmp_path / "vit.pth"
    torch.save(build_reference_sam(embed_dim=256, depth=4, num_heads=4, global_attn_indexes=(1, 3)).state_dict(), path)
    sam_mlx.load(str(path), dtype="float16")  # once first: the first load in a process allocates ~20 MB once
    mx.clear_cache()
    model, peak = peak_of(lambda: sam_mlx.load(str(path), dtype="float16"))
    sizes = [v.size for _, v in tree_flatten(model.parameters())]
    half_total, largest = 2 * sum(sizes), 4 * max(sizes)
    assert half_total + 2 * largest < 4 * sum(sizes)  # the bound below tells the two apart
    assert peak <= half_total + 2 * largest, (peak, half_total, largest)


def test_the_memory_check_on_a_gpu_uses_mlxs_recommended_working_set(monkeypatch):
    model = sam_mlx.load(str(MOBILE_SAM))
    monkeypatch.setattr(resources, "machine_memory", lambda: 64 << 30)
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": "applegpu_g13g",
                                                    "max_recommended_working_set_size": 1 << 30})
    sam_mlx.SamPredictor(model, sizing="stretch", size=1024)  # on the CPU's branches: 64 GB
    with gpu_branches():
        sam_mlx.SamPredictor(model, sizing="stretch", size=1024)  # ~0.6 GB
        with pytest.raises(ValueError, match=r"encoding an image at 4096x4096 would need about [\d.]+ GB of memory "
                                             r"\(estimated for the GPU's fused attention\), more than the 1\.1 GB of "
                                             r"the GPU's recommended working set \(MLX's device_info\)"):
            sam_mlx.SamPredictor(model, sizing="stretch", size=4096)


def test_gelu_on_the_gpu_is_mlxs_exact_gelu():
    x = mx.array(np.linspace(-8, 8, 1001, dtype=np.float32)).astype(mx.float16)
    with gpu_branches():
        ours = elementwise.gelu(x)
    assert ours.dtype == mx.float16 and mx.array_equal(ours, nn.gelu(x)).item()
    np.testing.assert_allclose(np.array(elementwise.gelu(x.astype(mx.float32))),
                               np.array(nn.gelu(x.astype(mx.float32))), atol=3e-6)


@pytest.mark.parametrize("architecture, vit", [("applegpu_g13g", mx.float32), ("applegpu_g14s", mx.float32),
                                               ("applegpu_g15d", mx.bfloat16), ("applegpu_g16s", mx.bfloat16),
                                               ("sm_90", mx.bfloat16)])
def test_default_gpu_precision_by_chip(monkeypatch, architecture, vit):
    """The ViT gets bfloat16 where the chip computes it natively (M3 on), float32 on M1/M2; TinyViT float16."""
    monkeypatch.setattr(mx, "device_info", lambda: {"architecture": architecture})
    with gpu_branches():
        assert default_encoder_dtype(SamConfig(encoder=ViTConfig())) == vit
        assert default_encoder_dtype(SamConfig(encoder=TinyViTConfig())) == mx.float16
    assert default_encoder_dtype(SamConfig(encoder=ViTConfig())) == mx.float32


@pytest.mark.parametrize("choice, message", [("cpu", "True"), ("GPU ", "no GPU here"), ("tpu", "must be cpu or gpu")])
def test_sam_mlx_device_chooses_mlxs_device(choice, message):
    """The tests run on MLX's CPU device on a Mac too (conftest sets SAM_MLX_DEVICE=cpu); a wrong value is named."""
    script = "import sam_mlx; from sam_mlx.ops import backend; print(backend.on_cpu())"
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, SAM_MLX_DEVICE=choice),
                            capture_output=True, text=True, timeout=120)
    assert message in (result.stdout if choice == "cpu" else result.stderr), result.stderr[-500:]
