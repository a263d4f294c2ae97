"""The ``sam-mlx`` command, run as real subprocesses with the real MobileSAM weights on the shared photos.

Each run pays Python + MLX start-up and the model load; runs that encode an image also
pay the encoder, so the photos encoded are few: the dog once by ``encode`` (its tokens
then serve ``segment --tokens``), the dog and the groceries by a folder ``segment``,
the dog by ``everything``. The model cache is a fresh folder for the module, Hub offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from sam_mlx import cli
from sam_mlx.amg.mask_utils import coco_decode_rle
from sam_mlx.checkpoints import load as checkpoint
from sam_mlx.checkpoints.load import load_checkpoint
from sam_mlx.io.tokens import read_image_tokens
from sam_mlx.ops.bands import band_count

MODEL = str(MOBILE_SAM)
DOG = str(IMAGES / "dog.jpg")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_env")
    env = {k: v for k, v in os.environ.items() if k not in ("SAM_MLX_MODEL", "SAM_MLX_CACHE")}
    env.update(SAM_MLX_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1")
    return env


def run(env: dict[str, str], *args: str, cwd: Path | None = None, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sam_mlx.cli", *args], env={**env, **extra_env}, cwd=cwd,
        capture_output=True, text=True, timeout=600,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def dog():
    """The dog photo encoded in this process (original sizing), to check what the command writes."""
    predictor = sam_mlx.SamPredictor(load_checkpoint(MOBILE_SAM))
    predictor.set_image(IMAGES / "dog.jpg")
    return predictor


@pytest.fixture(scope="module")
def dog_tokens(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "dog.safetensors"
    result = ok(run(env, "encode", str(IMAGES / "dog.jpg"), "--out", str(out), "--model", MODEL))
    assert "64x64 image tokens" in result.stderr and out.is_file()
    return out


def read_mask(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 127


def test_help(env):
    assert "segment" in ok(run(env, "--help")).stdout
    for command, option in [("segment", "--bg-point"), ("encode", "--out"), ("convert", "--dtype"),
                            ("info", "--model"), ("everything", "--points-per-side")]:
        assert option in ok(run(env, command, "--help")).stdout


def test_console_script_is_installed(env):
    script = Path(sys.executable).with_name("sam-mlx")
    assert script.exists(), f"the sam-mlx console script is not installed next to {sys.executable}"
    result = subprocess.run([str(script), "info"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"sam_mlx {sam_mlx.__version__}" in result.stdout


def test_info(env):
    out = ok(run(env, "info", "--model", MODEL)).stdout
    assert f"sam_mlx {sam_mlx.__version__}" in out and f"mlx {mx.__version__}" in out
    assert "default device" in out and "BLAS: " in out
    assert f"image tokens in {band_count()} row band(s)" in out
    assert "tiny_vit float32 [" in out and '"encoder_kind": "tiny_vit"' in out


def test_info_model_defaults_to_the_environment(env):
    out = ok(run(env, "info", SAM_MLX_MODEL=MODEL)).stdout
    assert f"model: {MODEL}: tiny_vit float32 [" in out and '"encoder_kind": "tiny_vit"' in out


def test_encode_writes_the_same_tokens_as_set_image(dog, dog_tokens):
    saved = read_image_tokens(dog_tokens)
    assert saved.geometry == dog.geometry and (saved.sizing, saved.size) == ("original", 1024)
    np.testing.assert_allclose(np.array(saved.tokens), np.array(dog.features), atol=1e-5)


def test_segment_point_with_tokens(env, dog, dog_tokens, tmp_path):
    """One point: three candidate masks (the default for a lone point), from the saved tokens."""
    result = ok(run(env, "segment", str(IMAGES / "dog.jpg"), "--point", "250,400", "--tokens", str(dog_tokens),
                    "--out-dir", str(tmp_path), "--model", MODEL))
    assert "[1/1]" in result.stderr and "3 masks" in result.stderr
    report = json.loads((tmp_path / "dog.json").read_text())
    masks, scores, _ = dog.predict(np.array([[250.0, 400.0]]), np.array([1]))
    assert all(m["multimask"] for m in report["masks"]) and (report["width"], report["height"]) == (800, 534)
    assert [m["file"] for m in report["masks"]] == ["dog_mask0.png", "dog_mask1.png", "dog_mask2.png"]
    for record, mask, score in zip(report["masks"], masks, scores):
        saved = read_mask(tmp_path / record["file"])
        assert saved.shape == (534, 800) and (saved != mask).mean() < 1e-4
        assert record["score"] == pytest.approx(float(score), abs=1e-4)
        assert record["area"] == int(saved.sum())
        x, y, w, h = record["bbox"]
        ys, xs = np.nonzero(saved)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert record["prompt"] == {"points": [[250.0, 400.0]], "labels": [1], "box": None}
    assert Image.open(tmp_path / report["overlay"]).size == (800, 534)


def test_segment_folder_with_batched_boxes(env, dog, tmp_path):
    """A folder of two photos, two boxes and a background point: one prompt per box, decoded as a batch."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("dog.jpg", "groceries.jpg"):
        (folder / name).symlink_to(IMAGES / name)
    (folder / "notes.txt").write_text("not an image")
    boxes = [[200, 50, 650, 500], [100, 150, 350, 480]]
    result = ok(run(env, "segment", str(folder), "--box", "200,50,650,500", "--box", "100,150,350,480",
                    "--bg-point", "700,100", "--out-dir", str(tmp_path / "out"), "--model", MODEL))
    lines = result.stderr.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["[1/2]", "[2/2]"] and "dog.jpg" in lines[0]
    for stem in ("dog", "groceries"):
        report = json.loads((tmp_path / "out" / f"{stem}.json").read_text())
        assert not any(m["multimask"] for m in report["masks"])
        assert [m["prompt"]["box"] for m in report["masks"]] == boxes
        assert all(m["prompt"]["points"] == [[700.0, 100.0]] and m["prompt"]["labels"] == [0] for m in report["masks"])
    masks, scores, _ = dog.predict_batch(np.array([[[700.0, 100.0]]] * 2), np.array([[0]] * 2), np.array(boxes, float),
                                         multimask_output=False)
    report = json.loads((tmp_path / "out" / "dog.json").read_text())
    for record, mask, score in zip(report["masks"], masks[:, 0], scores[:, 0]):
        assert (read_mask(tmp_path / "out" / record["file"]) != mask).mean() < 1e-4
        assert record["score"] == pytest.approx(float(score), abs=1e-4)


def test_segment_box_crossing_the_border_as_given_or_clipped(env, dog, dog_tokens, tmp_path):
    """A box crossing the border is used as given (as the original takes it), or clipped with --clip-boxes."""
    box = [-200.0, 60.0, 700.0, 640.0]
    scores = {}
    for clip in (False, True):
        out = tmp_path / ("clipped" if clip else "given")
        ok(run(env, "segment", DOG, "--box=-200,60,700,640", "--tokens", str(dog_tokens), "--out-dir", str(out),
               "--model", MODEL, *(["--clip-boxes"] if clip else [])))
        report = json.loads((out / "dog.json").read_text())
        (record,) = report["masks"]
        assert record["prompt"]["box"] == box and report["settings"].get("clip_boxes", False) is clip
        mask, score, _ = dog.predict(box=np.array(box), multimask_output=False, clip_boxes=clip)
        assert record["score"] == pytest.approx(float(score[0]), abs=1e-4)
        assert (read_mask(out / record["file"]) != mask[0]).mean() < 1e-4
        scores[clip] = record["score"]
    assert abs(scores[True] - scores[False]) > 1e-2


def test_segment_rerun_leaves_no_stale_masks(env, dog_tokens, tmp_path):
    """Three masks, then one: the second run's JSON lists every mask PNG of the image, and no other is left."""
    other = tmp_path / "dog_mask1_mask0.png"  # an output of an image named dog_mask1.jpg: not the dog's
    other.write_bytes(b"another image's mask")
    args = ["segment", DOG, "--point", "250,400", "--tokens", str(dog_tokens), "--out-dir", str(tmp_path),
            "--model", MODEL]
    ok(run(env, *args))
    assert sorted(p.name for p in tmp_path.glob("dog_mask?.png")) == [f"dog_mask{i}.png" for i in range(3)]
    ok(run(env, *args, "--single"))
    report = json.loads((tmp_path / "dog.json").read_text())
    assert [m["file"] for m in report["masks"]] == ["dog_mask0.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dog.json", "dog_mask0.png", "dog_mask1_mask0.png", "dog_overlay.png"]
    assert other.read_bytes() == b"another image's mask"


def test_outputs_are_written_atomically(dog_tokens, tmp_path, monkeypatch, capsys):
    """A PNG write failing half-way (disk full) leaves no partial file that passes for a result."""
    real_save = Image.Image.save

    def fail_half_way(image, fp, *args, **kwargs):
        real_save(image, fp, *args, **kwargs)
        Path(fp).write_bytes(Path(fp).read_bytes()[:50])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", fail_half_way)
    code = cli.main(["segment", DOG, "--point", "250,400", "--tokens", str(dog_tokens), "--out-dir", str(tmp_path),
                     "--model", MODEL])
    assert code == 1 and "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_everything(env, tmp_path):
    result = ok(run(env, "everything", str(IMAGES / "dog.jpg"), "--points-per-side", "4", "--points-per-batch", "16",
                    "--out-dir", str(tmp_path), "--model", MODEL))
    assert "dog.jpg" in result.stderr and "masks in" in result.stderr
    report = json.loads((tmp_path / "dog.json").read_text())
    assert report["annotations"], "no masks found on the dog photo"
    for record in report["annotations"]:
        assert set(record) == {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score",
                               "crop_box"}
        mask = coco_decode_rle(record["segmentation"])
        assert mask.shape == (534, 800) and int(mask.sum()) == record["area"]
        assert record["predicted_iou"] > 0.88 and record["stability_score"] >= 0.95
    assert Image.open(tmp_path / report["overlay"]).size == (800, 534)


def test_convert(env, tmp_path):
    out = tmp_path / "mobile_sam_f16.safetensors"
    result = ok(run(env, "convert", MODEL, "--out", str(out), "--dtype", "float16"))
    assert "tiny_vit" in result.stderr
    ours = mx.load(str(out))
    theirs = dict(tree_flatten(load_checkpoint(MOBILE_SAM, dtype=mx.float32).parameters()))
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert value.dtype == mx.float16 and mx.array_equal(value, theirs[name].astype(mx.float16)).item(), name


def test_convert_keeps_float32_when_the_device_default_is_half_precision(tmp_path, monkeypatch):
    """On an Apple GPU the encoder loads in half precision by default; convert must not save those rounded weights."""
    theirs = dict(tree_flatten(load_checkpoint(MOBILE_SAM, dtype=mx.float32).parameters()))
    monkeypatch.setattr(checkpoint, "default_encoder_dtype", lambda config: mx.bfloat16)
    rounded = tree_flatten(load_checkpoint(MOBILE_SAM).image_encoder.parameters())
    assert {v.dtype for _, v in rounded} == {mx.bfloat16}  # the patch bites
    folder = tmp_path / "weights"  # a folder goes through sam_mlx.load, a file straight to load_checkpoint
    folder.mkdir()
    (folder / MOBILE_SAM.name).symlink_to(MOBILE_SAM)
    for i, source in enumerate((MODEL, str(folder))):
        out = tmp_path / f"converted{i}.safetensors"
        assert cli.main(["convert", source, "--out", str(out)]) == 0
        ours = mx.load(str(out))
        assert ours.keys() == theirs.keys()
        for name, value in ours.items():
            assert value.dtype == mx.float32 and mx.array_equal(value, theirs[name]).item(), (source, name)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    (folder / "broken.pth").write_bytes(b"not a checkpoint at all")
    (folder / "empty").mkdir()
    return {"image": folder / "broken.jpg", "checkpoint": folder / "broken.pth", "empty": folder / "empty"}


ERRORS = [
    ("missing image", ["segment", "missing.jpg", "--point", "1,1", "--model", MODEL], 1,
     "image not found: missing.jpg"),
    ("bad point syntax", ["segment", DOG, "--point", "1;2", "--model", MODEL], 2, "bad point '1;2': expected X,Y"),
    ("bad box syntax", ["segment", DOG, "--box", "1,2,3", "--model", MODEL], 2, "expected X1,Y1,X2,Y2"),
    ("point outside", ["segment", DOG, "--point", "900,100", "--model", MODEL], 1,
     "point 900,100 is outside dog.jpg (800x534"),
    ("inverted box", ["segment", DOG, "--box", "300,300,100,100", "--model", MODEL], 1, "X2 < X1"),
    ("no prompt", ["segment", DOG, "--model", MODEL], 1, "no prompt"),
    ("no model", ["segment", DOG, "--point", "1,1"], 1, "no model: pass --model"),
    ("unreadable image", ["segment", "{image}", "--point", "1,1", "--model", MODEL], 1, "not a readable image"),
    ("empty folder", ["everything", "{empty}", "--model", MODEL], 1, "no images"),
    ("bad checkpoint", ["segment", DOG, "--point", "1,1", "--model", "{checkpoint}"], 1,
     "not a PyTorch (.pth) or safetensors checkpoint"),
    ("missing checkpoint", ["info", "--model", "weights/missing.pth"], 1, "checkpoint not found: weights/missing.pth"),
    ("offline, not cached", ["info", "--model", "sam-vit-base"], 1, "not cached and HF_HUB_OFFLINE=1 is set"),
    ("bad convert dtype", ["convert", MODEL, "--out", "x.safetensors", "--dtype", "int8"], 2, "invalid choice"),
    ("bad size", ["encode", DOG, "--out", "x.safetensors", "--size", "1000", "--model", MODEL], 1,
     "multiple of 16"),
    ("--out with a folder", ["encode", str(IMAGES), "--out", "x.safetensors", "--model", MODEL], 1,
     "--out FILE takes one image"),
    ("--out and --out-dir", ["encode", DOG, "--out", "x.safetensors", "--out-dir", "x"], 2, "not allowed with"),
    ("no command", [], 2, "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize("args, code, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_are_one_line(env, bad_files, tmp_path, args, code, message):
    result = run(env, *[a.format(**bad_files) for a in args], cwd=tmp_path)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


def test_tokens_from_another_sizing_refused(env, dog_tokens, tmp_path):
    result = run(env, "segment", DOG, "--point", "1,1", "--tokens", str(dog_tokens), "--sizing", "stretch",
                 "--model", MODEL, "--out-dir", str(tmp_path))
    assert result.returncode == 1 and "made with sizing 'original' at size 1024" in result.stderr


def test_debug_shows_the_traceback(env):
    for args in (["--debug", "segment", "missing.jpg", "--point", "1,1"],
                 ["segment", "missing.jpg", "--point", "1,1", "--debug"]):
        result = run(env, *args, "--model", MODEL)
        assert result.returncode == 1 and "Traceback" in result.stderr and "image not found" in result.stderr
