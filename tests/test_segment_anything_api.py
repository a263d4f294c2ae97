"""segment_anything's public API on sam_mlx: Meta's two notebooks, step by step, with only the import changed.

The steps follow ``predictor_example.ipynb`` (truck.jpg: the registry and ``.to(device)``, ``set_image``, one point
with 3 masks, two points with the best mask's logits as input, a background point, a box, a box with a point, four
boxes through ``transform.apply_boxes_torch`` and ``predict_torch``, then ``sam(batched_input)`` over truck.jpg and
groceries.jpg) and ``automatic_mask_generator_example.ipynb`` (dog.jpg: the generator with its defaults, then with
the notebook's second settings), in the same order and with the same arguments. Every output is compared with what
Meta's own code gives on the same MobileSAM weights (``reference.build_reference_mobile_sam``: Meta's ``Sam`` with
MobileSAM's TinyViT), within the parity tolerances of ``test_mobile_sam_reference.py`` and ``tests/amg``.

The reference's image encoder runs once per distinct input (a cache), so truck.jpg is encoded once for the
predictor and the batched forward. For the mask generator the reference is handed sam_mlx's image tokens for the
same encoder input (as ``tests/amg`` does: its crops would cost a PyTorch TinyViT run each); the encoders are
compared on the photos above. The generator's 32 x 32 point grids take minutes on a small CPU (the second settings'
crops more than ten): they run with ``SAM_MLX_AMG_FULL=all``; ``SAM_MLX_AMG_FULL=1`` (as CI sets it, where
``tests/amg`` already compares the 32 x 32 defaults on dog.jpg) samples 16 points a side, and otherwise 4.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import IMAGES, MOBILE_SAM, mask_iou
from reference import (
    build_reference_mobile_sam,
    reference_generator_class,
    reference_predictor_class,
    reference_transforms_module,
)
from sam_mlx.checkpoints.errors import CheckpointError
from sam_mlx.fast import FastSam
from sam_mlx.segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from sam_mlx.segment_anything.utils.transforms import ResizeLongestSide

FULL = os.environ.get("SAM_MLX_AMG_FULL", "") == "all"
POINTS_PER_SIDE = {"all": 32, "1": 16}.get(os.environ.get("SAM_MLX_AMG_FULL", ""), 4)  # the notebooks use 32
RECORD_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}
TRUCK_BOXES = [[75, 275, 1725, 850], [425, 600, 700, 875], [1375, 550, 1650, 800], [1240, 675, 1400, 750]]
GROCERIES_BOXES = [[450, 170, 520, 350], [350, 190, 450, 350], [500, 170, 580, 350], [580, 170, 640, 350]]


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / name).convert("RGB"))


class _EncodeOnce(torch.nn.Module):
    """The reference's image encoder, run once per distinct input image (per image of a batch)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.img_size, self.tokens = encoder, encoder.img_size, {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for image in images:
            key = hashlib.sha1(image.numpy().tobytes()).hexdigest()
            if key not in self.tokens:
                self.tokens[key] = self.encoder(image[None])
            out.append(self.tokens[key])
        return torch.cat(out)


class _SamMlxTokens(torch.nn.Module):
    """An image encoder handing back the tokens sam_mlx computed for the same encoder input."""

    img_size = 1024

    def __init__(self, encoded: list[tuple[np.ndarray, np.ndarray]]):
        super().__init__()
        self.encoded = encoded

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = images.permute(0, 2, 3, 1).numpy()
        for pixels, tokens in self.encoded:
            if pixels.shape == image.shape and np.allclose(pixels, image, atol=1e-4):
                return torch.from_numpy(tokens).permute(0, 3, 1, 2)
        raise AssertionError("the reference encoded an input sam_mlx did not")


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """Meta's MobileSAM on the shared checkpoint, its encoder run once per image."""
    sam = build_reference_mobile_sam(MOBILE_SAM)
    sam.image_encoder = _EncodeOnce(sam.image_encoder)
    return sam


@pytest.fixture(scope="module")
def sam():
    """The notebooks' first cell, with sam_mlx's import: the registry, then ``.to(device)`` (device = "cuda")."""
    model = sam_model_registry["vit_t"](checkpoint=str(MOBILE_SAM))
    assert model.to(device="cuda") is model
    return model


@pytest.fixture(scope="module")
def truck(sam, reference):
    """``SamPredictor(sam)`` and ``set_image`` on truck.jpg, for sam_mlx and the original."""
    image = photo("truck.jpg")
    ours, theirs = SamPredictor(sam), reference_predictor_class()(reference)
    ours.set_image(image)
    with torch.no_grad():
        theirs.set_image(image)
    return image, ours, theirs


def assert_same_prediction(ours: tuple, theirs: tuple, label: str) -> None:
    """(masks, scores, low-res logits), numpy or tensors: the same shapes and types, scores within 1e-4, logits
    within 1e-3, masks equal but for a few borderline pixels."""
    assert type(ours[0]) is type(theirs[0]), label
    if isinstance(theirs[0], torch.Tensor):
        assert all(o.device == t.device and o.dtype == t.dtype for o, t in zip(ours, theirs)), label
        ours, theirs = [o.numpy() for o in ours], [t.numpy() for t in theirs]
    (masks, scores, logits), (ref_masks, ref_scores, ref_logits) = ours, theirs
    assert masks.shape == ref_masks.shape and masks.dtype == ref_masks.dtype == bool, label
    assert scores.shape == ref_scores.shape and logits.shape == ref_logits.shape, label
    assert scores.dtype == ref_scores.dtype and logits.dtype == ref_logits.dtype, label
    assert np.abs(scores - ref_scores).max() <= 1e-4, label
    assert np.abs(logits - ref_logits).max() <= 1e-3, label
    assert (masks == ref_masks).mean() >= 0.9999, label
    for got, want in zip(masks.reshape(-1, *masks.shape[-2:]), ref_masks.reshape(-1, *ref_masks.shape[-2:])):
        assert mask_iou(got, want) >= 0.999, label


def both(truck, **kwargs) -> tuple[tuple, tuple]:
    _, ours, theirs = truck
    with torch.no_grad():
        return ours.predict(**kwargs), theirs.predict(**kwargs)


# ------------------------------------------------------------------ predictor_example.ipynb
def test_model_and_predictor_attributes(sam, truck):
    image, ours, theirs = truck
    assert sam.image_encoder.img_size == 1024 and sam.mask_threshold == 0.0 and sam.image_format == "RGB"
    assert sam.eval() is sam and sam.device == "cpu" and sam.device.type == "cpu"
    assert ours.is_image_set and ours.original_size == theirs.original_size == image.shape[:2]
    assert ours.input_size == theirs.input_size == (683, 1024)
    assert ours.device == theirs.device
    embedding = ours.get_image_embedding()
    assert isinstance(embedding, torch.Tensor) and embedding.shape == (1, 256, 64, 64)
    assert np.abs(embedding.numpy() - theirs.get_image_embedding().numpy()).max() <= 1e-3
    assert tuple(ours.features.shape) == (1, 64, 64, 256)  # sam_mlx's tokens: channels last


def test_one_point_three_masks(truck):
    ours, theirs = both(truck, point_coords=np.array([[500, 375]]), point_labels=np.array([1]),
                        multimask_output=True)
    assert ours[0].shape == (3, 1200, 1800)
    assert_same_prediction(ours, theirs, "one point")


def first_point_logits(truck) -> tuple[np.ndarray, np.ndarray]:
    """Each side's best low-res logits for the single point, as the notebook feeds them back."""
    ours, theirs = both(truck, point_coords=np.array([[500, 375]]), point_labels=np.array([1]),
                        multimask_output=True)
    return ours[2][np.argmax(ours[1])], theirs[2][np.argmax(theirs[1])]


@pytest.mark.parametrize("labels", [[1, 1], [1, 0]], ids=["two_points", "background_point"])
def test_points_with_the_best_mask_as_input(truck, labels):
    _, predictor, reference = truck
    our_input, their_input = first_point_logits(truck)
    kwargs = dict(point_coords=np.array([[500, 375], [1125, 625]]), point_labels=np.array(labels),
                  multimask_output=False)
    ours = predictor.predict(**kwargs, mask_input=our_input[None, :, :])
    with torch.no_grad():
        theirs = reference.predict(**kwargs, mask_input=their_input[None, :, :])
    assert ours[0].shape == (1, 1200, 1800)
    assert_same_prediction(ours, theirs, f"points {labels} with a mask input")


def test_a_box(truck):
    input_box = np.array([425, 600, 700, 875])
    ours, theirs = both(truck, point_coords=None, point_labels=None, box=input_box[None, :], multimask_output=False)
    assert_same_prediction(ours, theirs, "box")


def test_a_box_and_a_point(truck):
    ours, theirs = both(truck, point_coords=np.array([[575, 750]]), point_labels=np.array([0]),
                        box=np.array([425, 600, 700, 875]), multimask_output=False)
    assert_same_prediction(ours, theirs, "box and background point")


def test_batched_boxes_through_predict_torch(truck):
    image, predictor, reference = truck
    input_boxes = torch.tensor(TRUCK_BOXES, device=predictor.device)
    transformed_boxes = predictor.transform.apply_boxes_torch(input_boxes, image.shape[:2])
    ours = predictor.predict_torch(point_coords=None, point_labels=None, boxes=transformed_boxes,
                                   multimask_output=False)
    their_boxes = reference.transform.apply_boxes_torch(input_boxes, image.shape[:2])
    assert torch.equal(transformed_boxes, their_boxes) and transformed_boxes.dtype == their_boxes.dtype
    with torch.no_grad():
        theirs = reference.predict_torch(point_coords=None, point_labels=None, boxes=their_boxes,
                                         multimask_output=False)
    assert ours[0].shape == (4, 1, 1200, 1800)  # (batch_size) x (num_predicted_masks_per_input) x H x W
    assert_same_prediction(ours, theirs, "batched boxes")
    # The transformed boxes given where original-image pixels belong would silently give wrong masks: refused.
    with pytest.raises(ValueError, match="transformed to the encoder input's frame.*predict_torch"):
        predictor.predict_batch(boxes=transformed_boxes)
    with pytest.raises(ValueError, match="transformed to the encoder input's frame"):
        predictor.predict(box=predictor.transform.apply_boxes(np.array(TRUCK_BOXES[:1]), image.shape[:2]))


def test_batched_forward_over_two_images(sam, reference):
    truck_image, groceries = photo("truck.jpg"), photo("groceries.jpg")

    def batched_input(model, resize_transform) -> list[dict]:
        def prepare_image(image, transform, device):
            image = transform.apply_image(image)
            image = torch.as_tensor(image, device=device.device)
            return image.permute(2, 0, 1).contiguous()

        truck_boxes = torch.tensor(TRUCK_BOXES, device=model.device)
        groceries_boxes = torch.tensor(GROCERIES_BOXES, device=model.device)
        return [
            {"image": prepare_image(truck_image, resize_transform, model),
             "boxes": resize_transform.apply_boxes_torch(truck_boxes, truck_image.shape[:2]),
             "original_size": truck_image.shape[:2]},
            {"image": prepare_image(groceries, resize_transform, model),
             "boxes": resize_transform.apply_boxes_torch(groceries_boxes, groceries.shape[:2]),
             "original_size": groceries.shape[:2]},
        ]

    ours = sam(batched_input(sam, ResizeLongestSide(sam.image_encoder.img_size)), multimask_output=False)
    reference_transform = reference_transforms_module().ResizeLongestSide(reference.image_encoder.img_size)
    theirs = reference(batched_input(reference, reference_transform), multimask_output=False)
    assert len(ours) == len(theirs) == 2
    for i, (our_output, their_output) in enumerate(zip(ours, theirs)):
        assert list(our_output) == list(their_output) == ["masks", "iou_predictions", "low_res_logits"]
        assert_same_prediction(tuple(our_output.values()), tuple(their_output.values()), f"batched image {i}")
    assert ours[1]["masks"].shape == (4, 1, 534, 800)


# ------------------------------------------------------------------ automatic_mask_generator_example.ipynb
@pytest.fixture(scope="module")
def generator_reference(reference, sam):
    """Meta's generator class and a reference model given sam_mlx's tokens for the inputs sam_mlx encoded."""
    encoded: list[tuple[np.ndarray, np.ndarray]] = []
    encode = FastSam.encode

    def recording_encode(fast, pixels):
        tokens = encode(fast, pixels)
        encoded.append((np.array(pixels), np.array(tokens)))
        return tokens

    m = sys.modules["segment_anything.modeling"]
    model = m.Sam(image_encoder=_SamMlxTokens(encoded), prompt_encoder=reference.prompt_encoder,
                  mask_decoder=reference.mask_decoder).eval()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(FastSam, "encode", recording_encode)
        yield reference_generator_class(), model


def assert_same_records(ours: list[dict], theirs: list[dict], label: str) -> None:
    """The same records: every key, each mask matched by the original's with IoU >= 0.9 (and >= 95% of either
    side matched), the matched pairs' scores within 1e-3 and stability within 0.02 (tests/amg's tolerances)."""
    assert theirs, f"{label}: the original found no masks; the comparison would be empty"
    assert all(set(r) == RECORD_KEYS for r in ours + theirs), label
    a = np.stack([r["segmentation"].ravel() for r in ours]).astype(np.float32)
    b = np.stack([r["segmentation"].ravel() for r in theirs]).astype(np.float32)
    inter = a @ b.T
    iou = inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter)
    assert (iou.max(1) >= 0.9).mean() >= 0.95 and (iou.max(0) >= 0.9).mean() >= 0.95, label
    for i, record in enumerate(ours):
        j = int(np.argmax(iou[i]))
        if iou[i, j] >= 0.9 and record["point_coords"] == theirs[j]["point_coords"]:
            assert abs(record["predicted_iou"] - theirs[j]["predicted_iou"]) < 1e-3, label
            assert abs(record["stability_score"] - theirs[j]["stability_score"]) < 0.02, label
            assert record["crop_box"] == theirs[j]["crop_box"], label
    print(f"\n[{label}] sam_mlx {len(ours)} masks, the original {len(theirs)}")


def test_generator_with_default_settings(sam, generator_reference):
    reference_class, reference_model = generator_reference
    image = photo("dog.jpg")
    options = {} if FULL else dict(points_per_side=POINTS_PER_SIDE)
    mask_generator = SamAutomaticMaskGenerator(sam, **options)
    assert isinstance(mask_generator.predictor, SamPredictor) and mask_generator.predictor.model is sam
    masks = mask_generator.generate(image)
    assert_same_records(masks, reference_class(reference_model, **options).generate(image), "defaults")
    assert all(r["segmentation"].shape == image.shape[:2] for r in masks)


def test_generator_with_the_second_settings(sam, generator_reference):
    reference_class, reference_model = generator_reference
    image = photo("dog.jpg")
    options = dict(points_per_side=POINTS_PER_SIDE, pred_iou_thresh=0.86, stability_score_thresh=0.92,
                   crop_n_layers=1, crop_n_points_downscale_factor=2, min_mask_region_area=100)
    masks2 = SamAutomaticMaskGenerator(model=sam, **options).generate(image)
    assert_same_records(masks2, reference_class(model=reference_model, **options).generate(image), "second settings")
    assert len({tuple(r["crop_box"]) for r in masks2}) > 1


# ------------------------------------------------------------------ boxes as the original takes them
def test_a_box_crossing_the_border_is_taken_as_given(truck):
    """Detector boxes often cross the border: SAM reads the corners where they are, so clipping moves the mask
    (this box: score 0.964 clipped, 0.643 as the original)."""
    box = np.array([-300, 200, 2100, 950])
    ours, theirs = both(truck, box=box, multimask_output=False)
    assert_same_prediction(ours, theirs, "border box")
    _, predictor, _ = truck
    clipped = predictor.predict(box=box, multimask_output=False, clip_boxes=True)
    assert abs(float(clipped[1][0]) - float(theirs[1][0])) > 0.1
    assert mask_iou(clipped[0][0], theirs[0][0]) < 0.9


# ------------------------------------------------------------------ what cannot be the original's
def test_what_cannot_be_the_originals_is_refused(sam):
    for device in ("cpu", "cuda", "mps", "gpu", "cuda:1", torch.device("mps")):
        assert sam.to(device) is sam
    with pytest.raises(ValueError, match="device must be one of"):
        sam.to("tpu")
    with pytest.raises(ValueError, match=r"sam_mlx.load\(path, dtype="):
        sam.to(torch.float16)
    with pytest.raises(CheckpointError, match=r"tiny_vit checkpoint, not vit_h: use sam_model_registry\['vit_t'\]"):
        sam_model_registry["default"](checkpoint=str(MOBILE_SAM))
    with pytest.raises(ValueError, match="1 x 3 x H x W image with longest side 1024"):
        SamPredictor(sam).set_torch_image(torch.zeros(1, 3, 512, 512), (512, 512))


def test_no_torch_import_unless_a_tensor_is_passed_or_returned():
    """The notebooks' numpy steps run without torch being imported; predict_torch and sam(batched_input) given
    numpy return numpy."""
    code = """
import sys
import numpy as np
from sam_mlx.segment_anything import SamPredictor, sam_model_registry
from sam_mlx.segment_anything.utils.transforms import ResizeLongestSide
sam = sam_model_registry["vit_t"](checkpoint=sys.argv[1]).to(device="mps")
predictor = SamPredictor(sam)
image = np.full((60, 80, 3), 120, np.uint8)
predictor.set_image(image)
masks, scores, logits = predictor.predict(point_coords=np.array([[40, 30]]), point_labels=np.array([1]))
boxes = predictor.transform.apply_boxes(np.array([[10, 10, 50, 40]]), image.shape[:2])
masks, scores, logits = predictor.predict_torch(None, None, boxes=boxes)
resize = ResizeLongestSide(1024)
out = sam([{"image": resize.apply_image(image).transpose(2, 0, 1), "original_size": image.shape[:2],
            "boxes": boxes}], multimask_output=False)
assert isinstance(masks, np.ndarray) and masks.shape == (1, 3, 60, 80), masks.shape
assert isinstance(out[0]["masks"], np.ndarray) and out[0]["masks"].shape == (1, 1, 60, 80)
print("torch" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code, str(MOBILE_SAM)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_transforms_and_amg_helpers_match_the_originals():
    """``utils.transforms`` and ``utils.amg`` give what the original's give, numpy for numpy and tensors for tensors."""
    import importlib

    from sam_mlx.segment_anything.utils import amg

    theirs, ours = reference_transforms_module().ResizeLongestSide(1024), ResizeLongestSide(1024)
    image = photo("groceries.jpg")
    assert ours.get_preprocess_shape(534, 800, 1024) == theirs.get_preprocess_shape(534, 800, 1024) == (684, 1024)
    assert np.array_equal(ours.apply_image(image), theirs.apply_image(image))
    coords, boxes = np.array([[10.5, 20.25], [799, 533]]), np.array([[0, 0, 800, 534], [10.5, 3, 20, 40.25]])
    for method, value in (("apply_coords", coords), ("apply_boxes", boxes)):
        got, want = getattr(ours, method)(value, image.shape[:2]), getattr(theirs, method)(value, image.shape[:2])
        assert got.dtype == want.dtype and np.array_equal(got, want), method
        tensor = torch.from_numpy(value).to(torch.int64 if method == "apply_boxes" else torch.float64)
        got, want = (getattr(t, f"{method}_torch")(tensor, image.shape[:2]) for t in (ours, theirs))
        assert got.dtype == want.dtype and torch.equal(got, want), method

    reference_amg = importlib.import_module("segment_anything.utils.amg")
    generator = torch.Generator().manual_seed(0)
    masks, logits = torch.rand(3, 20, 30, generator=generator) > 0.5, torch.randn(3, 20, 30, generator=generator)
    boxes = torch.tensor([[0, 0, 10, 10], [5, 5, 30, 20]])
    pairs = [
        (amg.batched_mask_to_box(masks), reference_amg.batched_mask_to_box(masks)),
        (amg.calculate_stability_score(logits, 0.0, 1.0), reference_amg.calculate_stability_score(logits, 0.0, 1.0)),
        (amg.is_box_near_crop_edge(boxes, [0, 0, 30, 20], [0, 0, 60, 40]),
         reference_amg.is_box_near_crop_edge(boxes, [0, 0, 30, 20], [0, 0, 60, 40])),
        (amg.uncrop_boxes_xyxy(boxes, [5, 6, 35, 26]), reference_amg.uncrop_boxes_xyxy(boxes, [5, 6, 35, 26])),
        (amg.box_xyxy_to_xywh(boxes[1]), reference_amg.box_xyxy_to_xywh(boxes[1])),
    ]
    for got, want in pairs:
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    assert amg.mask_to_rle_pytorch(masks) == reference_amg.mask_to_rle_pytorch(masks)
    assert amg.build_all_layer_point_grids(4, 1, 2)[1].tolist() == reference_amg.build_all_layer_point_grids(
        4, 1, 2)[1].tolist()


def test_predict_torch_checks_prompts_in_the_resized_image(truck):
    """predict_torch's coordinates are the resized image's (1024 x 683 for truck.jpg): outside it is an error
    naming that frame."""
    _, predictor, _ = truck
    with pytest.raises(ValueError, match=r"point \(1030, 10\) is outside the 1024x683 resized image"):
        predictor.predict_torch(torch.tensor([[[1030.0, 10.0]]]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"lies outside the 1024x683 resized image"):
        predictor.predict_torch(None, None, boxes=torch.tensor([[0.0, 700.0, 100.0, 800.0]]))


def test_preprocess_and_postprocess_masks_match_the_originals(sam, reference):
    """``Sam.preprocess`` and ``Sam.postprocess_masks``, tensors in and out, as the original's."""
    resized = torch.from_numpy(ResizeLongestSide(1024).apply_image(photo("groceries.jpg"))).permute(2, 0, 1)
    ours, theirs = sam.preprocess(resized), reference.preprocess(resized)
    assert ours.shape == theirs.shape == (3, 1024, 1024) and ours.dtype == theirs.dtype
    assert (ours - theirs).abs().max() <= 1e-5
    low_res = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 10
    ours = sam.postprocess_masks(low_res, (684, 1024), (534, 800))
    theirs = reference.postprocess_masks(low_res, (684, 1024), (534, 800))
    assert ours.shape == theirs.shape == (2, 3, 534, 800) and (ours - theirs).abs().max() <= 1e-3
