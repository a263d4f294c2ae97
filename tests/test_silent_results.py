"""Inputs that used to give plausible-looking wrong results are refused with a message naming the problem.

Tokens of another image, tokens or weights edited after the fact, non-finite values, float16 overflow, out-of-range
hints and thresholds, and sizes whose encoding cannot fit in memory. MobileSAM's real weights; the dog and the
groceries photos are both 800 x 534, so one's tokens fit the other's geometry.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, ROOT
from reference import build_reference_sam
from sam_mlx import SamAutomaticMaskGenerator, cli
from sam_mlx.checkpoints.load import CheckpointError, load_checkpoint, save_model
from sam_mlx.cli.outputs import _json_text
from sam_mlx.io.images import load_image
from sam_mlx.io.tokens import ImageTokensError, load_image_tokens, model_fingerprint, save_image_tokens

DOG, GROCERIES = IMAGES / "dog.jpg", IMAGES / "groceries.jpg"


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(MOBILE_SAM)


@pytest.fixture(scope="module")
def dog_tokens(model, tmp_path_factory):
    predictor = sam_mlx.SamPredictor(model, sizing="stretch", size=256)
    predictor.set_image(DOG)
    return save_image_tokens(predictor, tmp_path_factory.mktemp("tokens") / "dog.safetensors", image_name="dog.jpg")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sam_mlx.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


# ------------------------------------------------------------------ tokens
def test_tokens_of_another_image_of_the_same_size_are_refused(model, dog_tokens):
    predictor = sam_mlx.SamPredictor(model, sizing="stretch", size=256)
    with pytest.raises(ImageTokensError) as error:
        load_image_tokens(predictor, dog_tokens, GROCERIES)
    message = str(error.value)
    assert "made from dog.jpg [" in message and f"not from {GROCERIES} [" in message
    assert not predictor.is_image_set
    load_image_tokens(predictor, dog_tokens, DOG)  # the right image: accepted
    from sam_mlx.io.images import pixel_fingerprint

    assert predictor.is_image_set and predictor.image_fingerprint == pixel_fingerprint(load_image(DOG))


def test_segment_command_refuses_tokens_of_another_image(dog_tokens, tmp_path):
    result = run_cli("segment", str(GROCERIES), "--point", "100,100", "--tokens", str(dog_tokens), "--model",
                     str(MOBILE_SAM), "--out-dir", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "made from dog.jpg [" in result.stderr and f"not from {GROCERIES} [" in result.stderr
    assert list(tmp_path.iterdir()) == []


def _tampered(path, tmp_path, tokens=None, **metadata):
    arrays, saved = mx.load(str(path), return_metadata=True)
    out = tmp_path / "tampered.safetensors"
    tokens = arrays["tokens"] if tokens is None else tokens
    mx.save_safetensors(str(out), {"tokens": tokens}, metadata={**saved, **metadata})
    return out


@pytest.mark.parametrize("change, message", [
    (lambda t: t.astype(mx.float16), "tokens of 256 channels in mlx.core.float16, but this model's encoder makes 256 "
                                     "channels in mlx.core.float32"),
    (lambda t: t[..., :128], "tokens of 128 channels"),
    (lambda t: t.astype(mx.int32), "tokens of dtype mlx.core.int32"),
    (lambda t: mx.where(mx.arange(t.shape[3]) == 3, mx.array(float("nan")), t), "tokens with NaN or infinite values"),
    (lambda t: mx.where(mx.arange(t.shape[3]) == 3, mx.array(float("inf")), t), "tokens with NaN or infinite values"),
], ids=["float16", "channels", "int32", "nan", "inf"])
def test_tokens_of_the_wrong_dtype_channels_or_values_are_refused(model, dog_tokens, tmp_path, change, message):
    tokens = mx.load(str(dog_tokens))["tokens"]
    path = _tampered(dog_tokens, tmp_path, change(tokens))
    with pytest.raises(ImageTokensError, match="tampered.safetensors: " + message.replace(".", r"\.")):
        load_image_tokens(sam_mlx.SamPredictor(model, sizing="stretch", size=256), path)


def test_tokens_whose_geometry_does_not_follow_their_sizing_are_refused(model, dog_tokens, tmp_path):
    path = _tampered(dog_tokens, tmp_path, input_size="[160, 256]")  # stretch 256 of 534 x 800 gives 176 x 256
    with pytest.raises(ImageTokensError, match="tampered.safetensors: the stored geometry .* is not what sizing "
                                               "'stretch' at size 256 gives"):
        load_image_tokens(sam_mlx.SamPredictor(model, sizing="stretch", size=256), path)


# ------------------------------------------------------------------ weights
def test_fingerprint_covers_every_weight(model):
    """Changing one value of any weight changes the fingerprint (a sample of weights across the model)."""
    before = model_fingerprint(model)
    names = [name for name, _ in tree_flatten(model.parameters())]
    changed = set()
    for name in names[:: max(1, len(names) // 40)] + names[-3:]:
        copy = load_checkpoint(MOBILE_SAM)
        weights = dict(tree_flatten(copy.parameters()))
        flat = weights[name].reshape(-1)
        edited = mx.where(mx.arange(flat.size) == flat.size - 1, flat[-1] + 1.0, flat).reshape(weights[name].shape)
        copy.load_weights([(name, edited)], strict=False)
        changed.add(model_fingerprint(copy))
        assert model_fingerprint(copy) != before, name
    assert len(changed) == len(names[:: max(1, len(names) // 40)] + names[-3:])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, value):
    state = build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict()
    state["mask_decoder.iou_prediction_head.layers.1.weight"][3, 5] = value
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad\.pth: weights with NaN or infinite values: "
                                              r"mask_decoder\.iou_prediction_head\.layers\.1\.weight"):
        load_checkpoint(tmp_path / "bad.pth")
    good = build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict()
    torch.save(good, tmp_path / "good.pth")
    path = save_model(load_checkpoint(tmp_path / "good.pth"), tmp_path / "good.safetensors")
    arrays, metadata = mx.load(str(path), return_metadata=True)
    name = "image_encoder.channel_projection.norm1.bias"
    arrays[name] = mx.full(arrays[name].shape, value)
    mx.save_safetensors(str(path), arrays, metadata=metadata)
    with pytest.raises(CheckpointError,
                       match=r"good\.safetensors: weights with NaN .*image_encoder\.channel_projection\.norm1\.bias"):
        load_checkpoint(path)


def test_json_outputs_are_strict():
    """Whatever a report holds, the file is standard JSON: no bare NaN or Infinity."""
    text = _json_text({"masks": [{"score": math.nan, "area": 3}, {"score": math.inf}], "size": 1.5})

    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    report = json.loads(text, parse_constant=refuse)
    assert report == {"masks": [{"score": None, "area": 3}, {"score": None}], "size": 1.5}


def test_convert_to_float16_refuses_weights_beyond_its_range(tmp_path):
    state = build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict()
    state["image_encoder.blocks.1.mlp.lin2.bias"][0] = 70000.0
    torch.save(state, tmp_path / "large.pth")
    code = cli.main(["convert", str(tmp_path / "large.pth"), "--out", str(tmp_path / "half.safetensors"),
                     "--dtype", "float16"])
    assert code == 1 and not (tmp_path / "half.safetensors").exists()
    with pytest.raises(ValueError, match=r"weights image_encoder\.stages\.0\.blocks\.1\.mlp\.lin2\.bias exceed "
                                         r"float16's largest value \(65504\)"):
        save_model(load_checkpoint(tmp_path / "large.pth"), tmp_path / "half.safetensors", dtype="float16")
    save_model(load_checkpoint(tmp_path / "large.pth"), tmp_path / "b.safetensors", dtype="bfloat16")  # in its range


# ------------------------------------------------------------------ prompts and options
def test_mask_input_beyond_float32_is_refused(model):
    predictor = sam_mlx.SamPredictor(model, sizing="stretch", size=256)
    predictor.set_image(DOG)
    _, _, low_res = predictor.predict(point_coords=np.array([[400, 260]]), point_labels=np.array([1]))
    hint = low_res[[0]].astype(np.float64)
    hint[0, 5, 5] = 1e300
    with pytest.raises(ValueError, match=r"mask_input values must lie within \+-1e\+06 \(low-res logits\), "
                                         r"got 1e\+300"):
        predictor.predict(point_coords=np.array([[400, 260]]), point_labels=np.array([1]), mask_input=hint)


@pytest.mark.parametrize("option, value", [("--pred-iou-thresh", "nan"), ("--stability-score-thresh", "inf"),
                                           ("--pred-iou-thresh", "1.5"), ("--crop-n-layers", "-1"),
                                           ("--min-mask-region-area", "-5")])
def test_everything_options_out_of_range_are_refused(capsys, tmp_path, option, value):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["everything", str(DOG), option, value, "--model", str(MOBILE_SAM), "--points-per-side", "2",
                  "--sizing", "stretch", "--size", "256", "--out-dir", str(tmp_path)])
    assert exit_.value.code == 2 and option in capsys.readouterr().err


@pytest.mark.parametrize("option", ["pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                                    "stability_score_offset", "crop_overlap_ratio"])
def test_generator_refuses_nan_options(model, option):
    with pytest.raises(ValueError, match=f"{option} must be a number from 0 to"):
        SamAutomaticMaskGenerator(model, **{option: float("nan")})


# ------------------------------------------------------------------ sizes and memory
def test_sizes_whose_encoding_cannot_fit_are_refused_with_the_estimate(model, monkeypatch):
    monkeypatch.setattr("sam_mlx.resources.machine_memory", lambda: 2 << 30)
    sam_mlx.SamPredictor(model, sizing="stretch", size=1024)  # ~0.6 GB: fine
    with pytest.raises(ValueError, match=r"encoding an image at 4096x4096 would need about 6\.8 GB of memory, more "
                                         r"than this machine's 2\.1 GB: use a smaller size"):
        sam_mlx.SamPredictor(model, sizing="stretch", size=4096)


def test_a_model_files_image_size_is_capped_too(tmp_path, monkeypatch):
    torch.save(build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict(),
               tmp_path / "tiny.pth")
    path = save_model(load_checkpoint(tmp_path / "tiny.pth"), tmp_path / "tiny.safetensors")
    arrays, metadata = mx.load(str(path), return_metadata=True)
    config = json.loads(metadata["sam_mlx_config"])
    config["image_size"] = 16384
    mx.save_safetensors(str(path), arrays, metadata={**metadata, "sam_mlx_config": json.dumps(config)})
    monkeypatch.setattr("sam_mlx.resources.machine_memory", lambda: 16 << 30)
    with pytest.raises(ValueError, match=r"encoding an image at 16384x16384 would need about [\d.]+ GB"):
        sam_mlx.SamPredictor(load_checkpoint(path))


def test_size_beyond_a_memory_limit_is_refused_not_crashed(tmp_path):
    """``--size 8192`` under ``ulimit -v`` 4 GB: one line with the estimate, exit 1 (it used to crash)."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
              "from sam_mlx.cli import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", script, "segment", str(DOG), "--point", "100,100", "--sizing",
                             "stretch", "--size", "8192", "--model", str(MOBILE_SAM), "--out-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "encoding an image at 8192x8192 would need about" in result.stderr
