"""Image tokens saved to disk and loaded back (here and in another process) give the same masks.

Real MobileSAM weights on the shared dog photo with its shared prompts; each sizing is
encoded once per module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, REFERENCE, predict_kwargs
from reference import build_reference_sam
from sam_mlx.checkpoints.load import load_checkpoint, save_model
from sam_mlx.io.tokens import (
    ImageTokensError,
    load_image_tokens,
    model_fingerprint,
    read_image_tokens,
    save_image_tokens,
)

PROMPTS = json.loads((REFERENCE / "dog.json").read_text())["prompts"]


def predict_all(predictor: sam_mlx.SamPredictor) -> dict[str, np.ndarray]:
    """Every shared dog prompt, multimask and single: {name/mode/output: array}."""
    out = {}
    for prompt in PROMPTS:
        kwargs = predict_kwargs(prompt)
        for multi in (True, False):
            masks, iou, low_res = predictor.predict(**kwargs, multimask_output=multi)
            mode = "multi" if multi else "single"
            out.update({f"{prompt['name']}/{mode}/masks": masks, f"{prompt['name']}/{mode}/iou": iou,
                        f"{prompt['name']}/{mode}/low_res": low_res})
    return out


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(MOBILE_SAM)


@pytest.fixture(scope="module")
def encoded(model, tmp_path_factory):
    """{sizing: (predictor with the dog encoded, its tokens file, its predictions)}."""
    folder = tmp_path_factory.mktemp("tokens")
    result = {}
    for sizing, size in (("original", None), ("stretch", 512)):
        predictor = sam_mlx.SamPredictor(model, sizing=sizing, size=size)
        predictor.set_image(IMAGES / "dog.jpg")
        path = save_image_tokens(predictor, folder / f"dog_{sizing}.safetensors")
        result[sizing] = (predictor, path, predict_all(predictor))
    return result


@pytest.mark.parametrize("sizing", ["original", "stretch"])
def test_reloaded_tokens_give_identical_masks(model, encoded, sizing):
    predictor, path, expected = encoded[sizing]
    fresh = sam_mlx.SamPredictor(model, sizing=sizing, size=predictor.size)
    saved = load_image_tokens(fresh, path)
    assert saved.geometry == predictor.geometry and fresh.geometry == predictor.geometry
    np.testing.assert_array_equal(fresh.get_image_embedding(), predictor.get_image_embedding())
    got = predict_all(fresh)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_file_contents(encoded):
    predictor, path, _ = encoded["stretch"]
    saved = read_image_tokens(path)
    assert saved.geometry.original_size == (534, 800) and saved.geometry.padded_size == (336, 512)
    assert tuple(saved.tokens.shape) == (1, 21, 32, 256) and saved.tokens.dtype == mx.float32
    assert (saved.sizing, saved.size) == ("stretch", 512)
    assert saved.model_identity.startswith("tiny_vit float32 [")


def test_second_process_loads_tokens(encoded, tmp_path):
    """A new process (new model object, nothing cached) accepts the file and predicts the same masks."""
    predictor, path, expected = encoded["original"]
    out = tmp_path / "masks.npz"
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(Path(__file__).resolve().parent)!r}, {str(Path(__file__).resolve().parents[1])!r}]
        import numpy as np, sam_mlx
        from sam_mlx.checkpoints.load import load_checkpoint
        from sam_mlx.io.tokens import load_image_tokens, model_fingerprint
        from test_tokens import predict_all
        predictor = sam_mlx.SamPredictor(load_checkpoint({str(MOBILE_SAM)!r}))
        load_image_tokens(predictor, {str(path)!r})
        np.savez({str(out)!r}, fingerprint=model_fingerprint(predictor.model), **predict_all(predictor))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    got = np.load(out)
    assert str(got["fingerprint"]) == model_fingerprint(predictor.model)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_other_model_refused(encoded, tmp_path):
    _, path, _ = encoded["original"]
    torch.save(build_reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict(),
               tmp_path / "vit.pth")
    other = sam_mlx.SamPredictor(load_checkpoint(tmp_path / "vit.pth"))
    with pytest.raises(ImageTokensError) as info:
        load_image_tokens(other, path)
    message = str(info.value)
    assert "made by model tiny_vit float32 [" in message and "this predictor's model is vit_custom float32 [" in message
    assert not other.is_image_set


def test_same_weights_other_dtype_refused(encoded):
    """Changing the weights (here to float16) changes the identity; the cached fingerprint follows."""
    _, path, _ = encoded["original"]
    half = load_checkpoint(MOBILE_SAM)
    before = model_fingerprint(half)
    half.set_dtype(mx.float16)
    assert model_fingerprint(half) != before
    with pytest.raises(ImageTokensError, match=r"tiny_vit float32 .* tiny_vit float16"):
        load_image_tokens(sam_mlx.SamPredictor(half), path)


def test_fingerprint_cached_on_the_model(model):
    first = model_fingerprint(model)
    assert model._sam_mlx_fingerprint.value == first and model_fingerprint(model) == first
    assert model_fingerprint(load_checkpoint(MOBILE_SAM)) == first  # same weights, new object


def test_other_sizing_refused(model, encoded):
    _, path, _ = encoded["stretch"]
    with pytest.raises(ImageTokensError, match=r"sizing 'stretch' at size 512, but this predictor uses sizing "
                                               r"'original' at size 1024"):
        load_image_tokens(sam_mlx.SamPredictor(model), path)
    with pytest.raises(ImageTokensError, match="size 512, but .* 'stretch' at size 1024"):
        load_image_tokens(sam_mlx.SamPredictor(model, sizing="stretch"), path)


def test_not_a_tokens_file(model, tmp_path):
    predictor = sam_mlx.SamPredictor(model)
    checkpoint = save_model(model, tmp_path / "model.safetensors")
    with pytest.raises(ImageTokensError, match="not a sam_mlx image tokens file"):
        load_image_tokens(predictor, checkpoint)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ImageTokensError, match="not a readable safetensors file"):
        load_image_tokens(predictor, tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="image tokens file not found"):
        load_image_tokens(predictor, tmp_path / "missing.safetensors")
    with pytest.raises(RuntimeError, match="no image set"):
        save_image_tokens(predictor, tmp_path / "none.safetensors")


def test_other_format_version_refused(model, encoded, tmp_path):
    _, path, _ = encoded["original"]
    arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    old = tmp_path / "old.safetensors"
    mx.save_safetensors(str(old), arrays, metadata={**metadata, "format_version": "1"})
    with pytest.raises(ImageTokensError, match=r"old.safetensors: image tokens format version '1', expected '3'"):
        load_image_tokens(sam_mlx.SamPredictor(model), old)


def test_write_is_atomic(encoded, monkeypatch, tmp_path):
    predictor, _, _ = encoded["stretch"]

    def crash_midway(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    target = tmp_path / "out" / "dog.safetensors"
    monkeypatch.setattr(mx, "save_safetensors", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_image_tokens(predictor, target)
    assert list(target.parent.iterdir()) == []
