"""Bad input gives a clear error naming the problem: checkpoints, images, prompts."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import sam_mlx
from helpers import MOBILE_SAM
from reference import build_reference_sam
from sam_mlx import CheckpointError
from sam_mlx.checkpoints.torch_pickle import read_torch_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(build_reference_sam(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return sam_mlx.SamPredictor(sam_mlx.load(str(tiny_checkpoint)))


@pytest.fixture(scope="module")
def image_set(predictor):
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
    return predictor


# ------------------------------------------------------------------ checkpoints
def test_truncated_pth(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    for cut in (len(data) // 2, len(data) - 100, 50):
        bad = tmp_path / f"cut{cut}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(bad.name)):
            sam_mlx.load(str(bad))


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    good = tmp_path / "model.safetensors"
    sam_mlx.save_model(sam_mlx.load(str(tiny_checkpoint)), good)
    data = good.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        sam_mlx.load(str(bad))


def test_not_a_checkpoint(tmp_path):
    for name, content in [("notes.pth", b"hello, not a model\n" * 10), ("empty.safetensors", b"")]:
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=name):
            sam_mlx.load(str(path))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="no_such_model.pth"):
        sam_mlx.load("/nonexistent/no_such_model.pth")


def _save_state(state: dict, path) -> str:
    torch.save({k: torch.as_tensor(v) for k, v in state.items()}, path)
    return str(path)


def test_sam2_checkpoint_is_named(tmp_path):
    state = {"image_encoder.trunk.patch_embed.proj.weight": np.zeros((4, 3, 7, 7), np.float32),
             "sam_mask_decoder.iou_token.weight": np.zeros((1, 256), np.float32),
             "memory_attention.layers.0.norm1.weight": np.zeros(256, np.float32)}
    with pytest.raises(CheckpointError, match="SAM 2"):
        sam_mlx.load(_save_state(state, tmp_path / "sam2.pt"))


def test_missing_extra_and_misshaped_keys(tiny_checkpoint, tmp_path):
    state = {k: v.numpy() for k, v in torch.load(tiny_checkpoint).items()}

    missing = dict(state)
    del missing["mask_decoder.iou_prediction_head.layers.2.bias"]
    message = r"missing\.pth: missing key 'mask_decoder\.iou_prediction_head\.layers\.2\.bias'"
    with pytest.raises(CheckpointError, match=message):
        sam_mlx.load(_save_state(missing, tmp_path / "missing.pth"))

    extra = dict(state, **{"mask_decoder.surprise.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"extra\.pth: unexpected weights mask_decoder\.surprise\.weight"):
        sam_mlx.load(_save_state(extra, tmp_path / "extra.pth"))

    wrong = dict(state)
    wrong["mask_decoder.transformer.layers.0.norm1.weight"] = np.zeros(255, np.float32)
    with pytest.raises(CheckpointError, match=r"wrong\.pth.*transformer\.layers\.0\.norm1\.weight.*\(255,\)"):
        sam_mlx.load(_save_state(wrong, tmp_path / "wrong.pth"))

    inconsistent = dict(state)  # the width is read from this key: the model itself cannot be built
    inconsistent["mask_decoder.iou_token.weight"] = np.zeros((1, 255), np.float32)
    with pytest.raises(CheckpointError, match="inconsistent.pth"):
        sam_mlx.load(_save_state(inconsistent, tmp_path / "inconsistent.pth"))


def test_weights_with_the_wrong_number_of_dimensions(tiny_checkpoint, tmp_path):
    """Config inference names the file, the key, its shape and the expected layout (no bare IndexError)."""
    state = {k: v.numpy() for k, v in torch.load(tiny_checkpoint).items()}
    cases = [
        ("image_encoder.patch_embed.proj.weight", np.zeros((32, 3), np.float32), "embed_dim x 3 x patch x patch"),
        ("image_encoder.blocks.0.attn.rel_pos_h", np.zeros(27, np.float32), "(2 x window - 1) x head_dim"),
        ("mask_decoder.iou_token.weight", np.zeros(256, np.float32), "1 x embed_dim"),
        ("mask_decoder.mask_tokens.weight", np.zeros((0, 256), np.float32), "(multimask outputs + 1) x embed_dim"),
    ]
    for i, (key, value, expected) in enumerate(cases):
        path = _save_state(dict(state, **{key: value}), tmp_path / f"flat{i}.pth")
        message = f"flat{i}.pth: {key} has shape {value.shape}, expected {expected}"
        with pytest.raises(CheckpointError, match=re.escape(message)):
            sam_mlx.load(path)


@pytest.fixture(scope="module")
def mobile_sam_state() -> dict[str, np.ndarray]:
    return {name: np.asarray(tensor) for name, tensor in read_torch_checkpoint(MOBILE_SAM).items()}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("image_encoder.layers.1.blocks.0.attn.norm.weight", None,
         "missing key 'image_encoder.layers.1.blocks.0.attn.norm.weight'"),
        ("image_encoder.layers.2.blocks.3.mlp.fc2.bias", None,
         "missing key 'image_encoder.layers.2.blocks.3.mlp.fc2.bias'"),
        ("image_encoder.layers.0.blocks.0.conv1.c.weight", np.zeros(256, np.float32),
         "image_encoder.layers.0.blocks.0.conv1.c.weight has shape (256,), expected hidden x dim x 1 x 1"),
        ("image_encoder.layers.1.blocks.0.attn.attention_biases", np.zeros((4, 50), np.float32),
         "image_encoder.layers.1.blocks.0.attn.attention_biases has shape (4, 50), expected heads x window^2"),
        ("image_encoder.layers.2.blocks.0.mlp.fc1.weight", np.zeros((640, 16), np.float32),
         "image_encoder.layers.2.blocks.0.mlp.fc1.weight has shape (640, 16), expected (640, 160)"),
        ("image_encoder.patch_embed.seq.0.bn.running_var", np.zeros((32, 1), np.float32),
         "image_encoder.patch_embed.seq.0.bn.running_var has shape (32, 1), expected (32,)"),
    ],
    ids=["missing-norm", "missing-bias", "flat-conv", "bad-bias-table", "narrow-linear", "batchnorm-2d"],
)
def test_bad_mobile_sam_weights_are_named(mobile_sam_state, tmp_path, key, value, message):
    """A faulty MobileSAM (TinyViT) file is reported by the file's own key name, not as bad sam_mlx metadata."""
    state = dict(mobile_sam_state)
    if value is None:
        del state[key]
    else:
        state[key] = value
    path = tmp_path / "mobile.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: {message}")):
        sam_mlx.load_checkpoint(path)


def test_safetensors_with_bad_metadata(tiny_checkpoint, tmp_path):
    import mlx.core as mx

    path = tmp_path / "meta.safetensors"
    metadata = {"format_version": "2", "sam_mlx_config": json.dumps({"encoder_kind": "swin"})}
    mx.save_safetensors(str(path), {"a": mx.zeros(2)}, metadata=metadata)
    with pytest.raises(CheckpointError, match="meta.safetensors: invalid sam_mlx metadata .*swin"):
        sam_mlx.load(str(path))


def test_other_format_version_refused(tiny_checkpoint, tmp_path):
    import mlx.core as mx

    good = sam_mlx.save_model(sam_mlx.load(str(tiny_checkpoint)), tmp_path / "good.safetensors")
    arrays, metadata = mx.load(str(good), return_metadata=True)
    assert metadata["format_version"] == "2"
    unversioned = {k: v for k, v in metadata.items() if k != "format_version"}
    for version, changed in (("'1'", {**unversioned, "format_version": "1"}), ("None", unversioned)):
        path = tmp_path / f"v{len(changed)}.safetensors"
        mx.save_safetensors(str(path), arrays, metadata=changed)
        message = f"{path}: sam_mlx model format version {version}, expected '2'"
        with pytest.raises(CheckpointError, match=re.escape(message)):
            sam_mlx.load(str(path))


def test_save_is_atomic(tiny_checkpoint, tmp_path, monkeypatch):
    """A write that fails half-way leaves neither a partial file nor a temporary behind."""
    import mlx.core as mx

    model = sam_mlx.load(str(tiny_checkpoint))
    target = tmp_path / "out.safetensors"

    def failing_save(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(mx, "save_safetensors", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sam_mlx.save_model(model, target)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ images
def _modes(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    yield "RGB", Image.fromarray(rgb)
    yield "L", Image.fromarray(rgb[..., 0])
    yield "RGBA", Image.fromarray(np.dstack([rgb, np.full((40, 60), 128, np.uint8)]))
    yield "P", Image.fromarray(rgb).convert("P")
    yield "CMYK", Image.fromarray(rgb).convert("CMYK")
    yield "I;16", Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    yield "F", Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0)


def test_image_modes(tmp_path):
    from sam_mlx.io.images import as_rgb_array

    for mode, image in _modes(tmp_path):
        array = as_rgb_array(image)
        assert array.shape == (40, 60, 3) and array.dtype == np.uint8, mode
    gray16 = as_rgb_array(Image.fromarray(np.full((4, 4), 65535, np.uint16)))
    assert (gray16 == 255).all()
    for value in (100, 300):  # 32-bit integer images are 16-bit data, whatever their maximum
        gray32 = as_rgb_array(Image.fromarray(np.full((4, 4), value * 257, np.int32), mode="I"))
        assert (gray32 == value if value < 256 else gray32 == 255).all()
    assert (as_rgb_array(Image.fromarray(np.full((4, 4), 200, np.int32), mode="I")) == 1).all()
    rgba = as_rgb_array(Image.fromarray(np.zeros((2, 2, 4), np.uint8)))  # fully transparent -> white
    assert (rgba == 255).all()


def test_image_files_all_modes(tmp_path, predictor):
    for mode, image in _modes(tmp_path):
        path = tmp_path / f"im_{mode.replace(';', '_')}.{'tiff' if mode in ('F', 'CMYK', 'I;16') else 'png'}"
        image.save(path)
        predictor.set_image(str(path))
        assert predictor.original_size == (40, 60), mode


def test_exif_rotated_photo(tmp_path, predictor):
    """A photo stored landscape with EXIF orientation 6 is seen (and segmented) as portrait."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :10] = 255  # a white band on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=95)
    from sam_mlx.io.images import load_image

    seen = load_image(path)
    assert seen.shape == (60, 40, 3)
    assert seen[:10].mean() > 200 and seen[20:].mean() < 50  # the band is now at the top
    predictor.set_image(str(path))
    masks, _, _ = predictor.predict(point_coords=np.array([[20, 5]]), point_labels=np.array([1]))
    assert masks.shape[1:] == (60, 40)


def test_unreadable_images(tmp_path, predictor):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.jpg.*not a readable image"):
        predictor.set_image(str(text))
    truncated = tmp_path / "half.png"
    Image.fromarray(np.zeros((50, 50, 3), np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ValueError, match="half.png"):
        predictor.set_image(str(truncated))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        predictor.set_image(str(tmp_path / "missing.jpg"))


def test_bad_arrays(predictor):
    with pytest.raises(ValueError, match="uint8"):
        predictor.set_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match=r"H x W x 3.*\(10, 10\)"):
        predictor.set_image(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match=r"\(10, 10, 4\)"):
        predictor.set_image(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        predictor.set_image(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(TypeError, match="list"):
        predictor.set_image([[1, 2, 3]])
    with pytest.raises(ValueError, match="image_format"):
        predictor.set_image(np.zeros((10, 10, 3), np.uint8), image_format="XYZ")


def test_tiny_and_huge_images(predictor):
    predictor.set_image(np.full((1, 1, 3), 200, np.uint8))
    masks, iou, low = predictor.predict(point_coords=np.array([[0.5, 0.5]]), point_labels=np.array([1]))
    assert masks.shape == (3, 1, 1)
    huge = np.zeros((9000, 12000, 3), np.uint8)
    huge[3000:6000, 4000:8000] = 255
    predictor.set_image(huge)
    assert predictor.input_size == (768, 1024)
    masks, _, _ = predictor.predict(box=np.array([4000, 3000, 8000, 6000]), multimask_output=False)
    assert masks.shape == (1, 9000, 12000) and masks.dtype == bool


# ------------------------------------------------------------------ prompts
def test_predict_before_set_image(tiny_checkpoint):
    fresh = sam_mlx.SamPredictor(sam_mlx.load(str(tiny_checkpoint)))
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.get_image_embedding()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(point_coords=[[250, 10]], point_labels=[1]), r"\(250, 10\) is outside the 200x120 image"),
        (dict(point_coords=[[-1, 10]], point_labels=[1]), "outside"),
        (dict(point_coords=[[np.nan, 10]], point_labels=[1]), "NaN"),
        (dict(point_coords=[[np.inf, 10]], point_labels=[1]), "infinite"),
        (dict(point_coords=[[10, 10]], point_labels=[2]),
         r"1 \(foreground\), 0 \(background\) or -1 \(padding\), got 2"),
        (dict(point_coords=[[10, 10], [0, 0]], point_labels=[-1, -1]), "only padding points"),
        (dict(point_coords=[[10, 10], [20, 20]], point_labels=[1]), "point_labels has shape"),
        (dict(point_coords=[10, 10], point_labels=[1]), "N x 2"),
        (dict(point_coords=[[10, 10]]), "together"),
        (dict(point_coords=np.zeros((0, 2)), point_labels=np.zeros(0)), "empty"),
        (dict(box=[50, 50, 10, 80]), "x2 < x1"),
        (dict(box=[500, 500, 600, 600]), "outside the 200x120 image"),
        (dict(box=[1, 2, 3]), "4 numbers"),
        (dict(box=[np.nan, 2, 3, 4]), "NaN"),
        (dict(), "no prompt"),
        (dict(mask_input=np.zeros((1, 64, 64))), r"1 x 256 x 256"),
        (dict(mask_input=np.zeros((3, 256, 256))), r"one low-res mask .* got shape \(3, 256, 256\)"),
        (dict(mask_input=np.full((1, 256, 256), np.nan)), "NaN"),
    ],
)
def test_bad_prompts(image_set, kwargs, message):
    kwargs = {k: np.asarray(v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        image_set.predict(**kwargs)


def test_boxes_are_taken_as_given_or_clipped_and_border_points_accepted(image_set):
    """A box crossing the border is used as given, as the original does; ``clip_boxes=True`` clips it to the image."""
    inside, inside_scores, inside_low = image_set.predict(box=np.array([0, 0, 200, 120]), multimask_output=False)
    clipped, clipped_scores, _ = image_set.predict(box=np.array([-50, -20, 260, 300]), multimask_output=False,
                                                   clip_boxes=True)
    assert (inside == clipped).all() and (inside_scores == clipped_scores).all()
    _, given_scores, given_low = image_set.predict(box=np.array([-50, -20, 260, 300]), multimask_output=False)
    assert given_scores != inside_scores and np.abs(given_low - inside_low).max() > 1e-3
    masks, _, _ = image_set.predict(point_coords=np.array([[200, 120]]), point_labels=np.array([1]))
    assert masks.shape == (3, 120, 200)


def test_padding_points_are_not_checked_against_the_image(image_set):
    """Label -1 pads prompts to a common point count; such points carry no position, only the padding embedding."""
    masks, _, _ = image_set.predict(np.array([[20, 30], [-999, 5000]]), np.array([1, -1]))
    assert masks.shape == (3, 120, 200)


@pytest.mark.parametrize("multimask, logits", [(True, False), (False, True)])
@pytest.mark.parametrize(
    "prompts",
    [dict(boxes=np.zeros((0, 4))), dict(point_coords=np.zeros((0, 1, 2)), point_labels=np.zeros((0, 1))),
     dict(mask_input=np.zeros((0, 1, 256, 256)))],
    ids=["boxes", "points", "masks"],
)
def test_empty_batch_gives_empty_arrays(image_set, prompts, multimask, logits):
    masks, scores, low_res = image_set.predict_batch(**prompts, multimask_output=multimask, return_logits=logits)
    count = 3 if multimask else 1
    assert masks.shape == (0, count, 120, 200) and masks.dtype == (np.float32 if logits else bool)
    assert scores.shape == (0, count) and low_res.shape == (0, count, 256, 256)


@pytest.mark.parametrize("size", [1.5, (256,), "512", True, (256, 256.0)])
def test_bad_sizes(tiny_checkpoint, size):
    with pytest.raises(ValueError, match="size must be an integer or a \\(height, width\\) pair"):
        sam_mlx.SamPredictor(sam_mlx.load(str(tiny_checkpoint)), sizing="stretch", size=size)


def test_numpy_and_list_sizes_are_plain_ints(tiny_checkpoint):
    model = sam_mlx.load(str(tiny_checkpoint))
    assert sam_mlx.SamPredictor(model, size=np.int64(512)).size == 512
    predictor = sam_mlx.SamPredictor(model, sizing="stretch", size=[np.int32(128), 160])
    assert predictor.size == (128, 160) and type(predictor.size[0]) is int


def test_batch_size_mismatch(image_set):
    with pytest.raises(ValueError, match="batch sizes differ"):
        image_set.predict_batch(
            point_coords=np.zeros((2, 1, 2)) + 5, point_labels=np.ones((2, 1)), boxes=np.array([[0, 0, 5, 5]] * 3)
        )


