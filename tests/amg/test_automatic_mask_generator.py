"""SamAutomaticMaskGenerator vs Meta's original generator, real MobileSAM weights, real photos.

Meta's segment-anything has no TinyViT, so the reference ``Sam`` gets an image encoder
that hands back sam_mlx's own image tokens for the same (pre-processed) input; its
prompt encoder and mask decoder are Meta's modules with MobileSAM's trained weights.
Both generators therefore see identical tokens, and the comparison covers the decoder,
the mask post-processing and the whole filtering / NMS / RLE pipeline. Masks are
matched by IoU (pycocotools) since float differences can flip a borderline mask.
Run with ``-s`` to see the wall times.

The original's default 32 x 32 grid costs minutes per image for each generator on a
small CPU (1024 prompts through the mask decoder), so by default the comparisons sample
sparser grids, every other option at its default. ``SAM_MLX_AMG_FULL=1`` (as CI sets it) runs
the real defaults (32 x 32) on the dog photo and the sparser grid on the other two, and denser crop and
region-area grids; ``SAM_MLX_AMG_FULL=all`` runs 32 x 32 on all three photos (~10 min more here).
"""

from __future__ import annotations

import hashlib
import os
import time

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

import sam_mlx
from helpers import IMAGES, MOBILE_SAM
from reference import reference_generator_class, segment_anything_modeling
from sam_mlx import SamAutomaticMaskGenerator
from sam_mlx.amg import mask_utils
from sam_mlx.fast import FastSam

FULL = os.environ.get("SAM_MLX_AMG_FULL", "") in ("1", "all")
FULL_PHOTOS = ("dog.jpg", "groceries.jpg", "truck.jpg") if os.environ.get("SAM_MLX_AMG_FULL") == "all" else ("dog.jpg",)
CROP_POINTS_PER_SIDE = 8 if FULL else 4
MIN_AREA_POINTS_PER_SIDE = 16 if FULL else 8
MATCH_IOU = 0.9
MIN_COVERAGE = 0.95
RECORD_KEYS = {"segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"}


# --------------------------------------------------------------------- reference
class _TokenLookup(torch.nn.Module):
    """Stands in for the image encoder: returns the tokens sam_mlx computed for this input."""

    img_size = 1024

    def __init__(self, encoded: dict[str, tuple[np.ndarray, np.ndarray]]):
        super().__init__()
        self.encoded = encoded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = x.permute(0, 2, 3, 1).numpy()
        for sam_input, tokens in self.encoded.values():
            if sam_input.shape == image.shape and np.allclose(sam_input, image, atol=1e-4):
                return torch.from_numpy(tokens).permute(0, 3, 1, 2)
        raise AssertionError("the reference encoded an input sam_mlx did not")


class Setup:
    """sam_mlx's MobileSAM (its fast path's encoder recording the image tokens) and the reference generator
    class and model."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.model = sam_mlx.load_checkpoint(str(MOBILE_SAM))
        # Encoder input digest -> (input, tokens): what the reference looks up, and a cache
        # (runs on the same image or crop encode it once).
        self.encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.encode_seconds = 0.0
        encode = FastSam.encode

        def recording_encode(fast, image):
            array = np.array(image)
            key = hashlib.sha1(array.tobytes()).hexdigest()
            if key not in self.encoded:
                start = time.perf_counter()
                self.encoded[key] = (array, np.array(encode(fast, image)))
                self.encode_seconds += time.perf_counter() - start
            return mx.array(self.encoded[key][1])

        monkeypatch.setattr(FastSam, "encode", recording_encode)

        m = segment_anything_modeling()
        self.reference_class = reference_generator_class()
        self.reference_model = m.Sam(
            image_encoder=_TokenLookup(self.encoded),
            prompt_encoder=m.PromptEncoder(
                embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
            ),
            mask_decoder=m.MaskDecoder(
                num_multimask_outputs=3,
                transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
            ),
        ).eval()
        state = torch.load(MOBILE_SAM, map_location="cpu", weights_only=True)
        decoder_state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
        missing, unexpected = self.reference_model.load_state_dict(decoder_state, strict=False)
        assert not unexpected and all(k.startswith(("image_encoder.", "pixel_")) for k in missing)

    def run_both(self, image: np.ndarray, label: str, **options):
        """(sam_mlx records, reference records) for the same options; prints both wall times."""
        self.encode_seconds = 0.0
        start = time.perf_counter()
        ours = SamAutomaticMaskGenerator(self.model, **options).generate(image)
        ours_time = time.perf_counter() - start - self.encode_seconds
        start = time.perf_counter()
        theirs = self.reference_class(self.reference_model, **options).generate(image)
        theirs_time = time.perf_counter() - start
        print(
            f"\n[amg {label}] wall time without image encoding: sam_mlx {ours_time:.1f} s ({len(ours)} masks), "
            f"original {theirs_time:.1f} s ({len(theirs)} masks); sam_mlx encoding {self.encode_seconds:.1f} s"
        )
        return ours, theirs


@pytest.fixture(scope="module")
def setup() -> Setup:
    if not MOBILE_SAM.is_file():
        pytest.fail(f"MobileSAM weights not found at {MOBILE_SAM}")
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield Setup(monkeypatch)


def _image(name: str) -> np.ndarray:
    return np.asarray(Image.open(IMAGES / name).convert("RGB"))


# ----------------------------------------------------------------------- checks
def _coco(mask: np.ndarray) -> dict:
    return coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))


def _coverage(ours: list[dict], theirs: list[dict]) -> tuple[float, float, np.ndarray]:
    """(share of ours matched in theirs, share of theirs matched in ours, IoU matrix)."""
    a = [_coco(r["segmentation"]) for r in ours]
    b = [_coco(r["segmentation"]) for r in theirs]
    if not a or not b:
        return float(not a and not b), float(not a and not b), np.zeros((len(a), len(b)))
    iou = np.asarray(coco_mask.iou(a, b, [0] * len(b))).reshape(len(a), len(b))
    return float((iou.max(1) >= MATCH_IOU).mean()), float((iou.max(0) >= MATCH_IOU).mean()), iou


def _assert_match(ours: list[dict], theirs: list[dict], label: str) -> None:
    ours_cov, theirs_cov, iou = _coverage(ours, theirs)
    print(
        f"[amg {label}] matched at IoU >= {MATCH_IOU}: {ours_cov:.1%} of sam_mlx's masks, "
        f"{theirs_cov:.1%} of the original's"
    )
    assert theirs, "the original found no masks; the comparison would be empty"
    assert theirs_cov >= MIN_COVERAGE and ours_cov >= MIN_COVERAGE
    # A mask and its best match made from the same prompt (a point gives three candidates,
    # so the best one) have the same scores up to float differences.
    prompt = lambda r: (tuple(r["point_coords"][0]), tuple(r["crop_box"]))  # noqa: E731
    for i, r in enumerate(ours):
        same = [j for j, t in enumerate(theirs) if prompt(t) == prompt(r)]
        if same and iou[i, same].max() >= MATCH_IOU:
            t = theirs[same[int(np.argmax(iou[i, same]))]]
            assert abs(r["predicted_iou"] - t["predicted_iou"]) < 1e-3
            assert abs(r["stability_score"] - t["stability_score"]) < 0.02


def _assert_records(records: list[dict], height: int, width: int) -> None:
    """Types, and area / bbox consistent with the binary segmentation."""
    for r in records:
        assert set(r) == RECORD_KEYS
        seg = r["segmentation"]
        assert seg.dtype == bool and seg.shape == (height, width)
        assert isinstance(r["area"], int) and r["area"] == int(seg.sum()) > 0
        ys, xs = np.nonzero(seg)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        assert all(isinstance(v, int) for v in r["bbox"] + r["crop_box"])
        assert isinstance(r["predicted_iou"], float) and isinstance(r["stability_score"], float)
        (x, y), = r["point_coords"]
        assert 0 <= x <= width and 0 <= y <= height


# ------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", ["dog.jpg", "groceries.jpg", "truck.jpg"])
def test_default_settings_match_original(setup, name):
    image = _image(name)
    points_per_side = 32 if FULL and name in FULL_PHOTOS else 8  # 32 is the default
    label = f"{name} defaults, points_per_side={points_per_side}"
    ours, theirs = setup.run_both(image, label, points_per_side=points_per_side)
    _assert_records(ours, *image.shape[:2])
    assert all(r["crop_box"] == [0, 0, image.shape[1], image.shape[0]] for r in ours)
    assert all(r["predicted_iou"] > 0.88 and r["stability_score"] >= 0.95 for r in ours)
    _assert_match(ours, theirs, label)


def test_crop_layers_match_original(setup):
    image = _image("dog.jpg")
    label = f"dog.jpg crop_n_layers=1, points_per_side={CROP_POINTS_PER_SIDE}"
    ours, theirs = setup.run_both(image, label, points_per_side=CROP_POINTS_PER_SIDE, crop_n_layers=1)
    _assert_records(ours, *image.shape[:2])
    crops, _ = mask_utils.generate_crop_boxes(image.shape[:2], 1, 512 / 1500)
    assert {tuple(r["crop_box"]) for r in ours} <= {tuple(mask_utils.box_xyxy_to_xywh(np.array(c))) for c in crops}
    assert len({tuple(r["crop_box"]) for r in ours}) > 1
    _assert_match(ours, theirs, label)


def test_min_mask_region_area_matches_original(setup):
    image = _image("groceries.jpg")
    area = 1000  # changes about 40% of the masks
    label = f"groceries.jpg min_mask_region_area={area}, points_per_side={MIN_AREA_POINTS_PER_SIDE}"
    ours, theirs = setup.run_both(image, label, points_per_side=MIN_AREA_POINTS_PER_SIDE, min_mask_region_area=area)
    _assert_records(ours, *image.shape[:2])
    for r in ours:  # no small holes are left
        assert not mask_utils.remove_small_regions(r["segmentation"], area, mode="holes")[1]
    _assert_match(ours, theirs, label)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_output_modes(setup):
    image = _image("dog.jpg")
    options = dict(points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.5)
    runs = {
        mode: SamAutomaticMaskGenerator(setup.model, output_mode=mode, **options).generate(image)
        for mode in ("binary_mask", "uncompressed_rle", "coco_rle")
    }
    binary = runs["binary_mask"]
    assert binary and all(len(records) == len(binary) for records in runs.values())
    for b, u, c in zip(binary, runs["uncompressed_rle"], runs["coco_rle"]):
        for other in (u, c):
            assert {k: v for k, v in other.items() if k != "segmentation"} == {
                k: v for k, v in b.items() if k != "segmentation"
            }
        mask = b["segmentation"]
        # Uncompressed RLE: column-major counts that decode to the mask and re-encode the same.
        assert u["segmentation"]["size"] == list(mask.shape)
        assert np.array_equal(mask_utils.rle_to_mask(u["segmentation"]), mask)
        assert mask_utils.mask_to_rle(mask[None])[0] == u["segmentation"]
        # COCO RLE: str counts, byte for byte pycocotools' encoding; decodes back exactly.
        coco = c["segmentation"]
        assert isinstance(coco["counts"], str) and coco["size"] == list(mask.shape)
        assert _coco(mask)["counts"].decode() == coco["counts"]
        assert np.array_equal(coco_mask.decode({"size": coco["size"], "counts": coco["counts"].encode()}), mask)
        assert coco_mask.frPyObjects(u["segmentation"], *mask.shape)["counts"].decode() == coco["counts"]
        assert int(coco_mask.area(_coco(mask))) == b["area"]


def test_tiny_images_and_progress(setup, tmp_path):
    options = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    generator = SamAutomaticMaskGenerator(setup.model, **options)
    calls = []
    records = generator.generate(np.full((1, 1, 3), 200, np.uint8), progress=lambda *args: calls.append(args))
    assert isinstance(records, list) and records  # no thresholds: the 4 points keep masks
    assert calls[0] == (0, 4) and calls[-1] == (4, 4)
    assert all(r["segmentation"].shape == (1, 1) and r["crop_box"] == [0, 0, 1, 1] for r in records)
    path = tmp_path / "tiny.png"  # a path works too (read as RGB by the predictor's image loader)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (3, 5, 3), np.uint8)).save(path)
    records = generator.generate(str(path))
    assert records and all(r["segmentation"].shape == (3, 5) for r in records)


def test_options_are_checked(setup):
    with pytest.raises(ValueError):
        SamAutomaticMaskGenerator(setup.model, points_per_side=None)
    with pytest.raises(ValueError):
        SamAutomaticMaskGenerator(setup.model, point_grids=[mask_utils.build_point_grid(4)])
    with pytest.raises(ValueError):
        SamAutomaticMaskGenerator(setup.model, output_mode="polygons")
    grid = mask_utils.build_point_grid(3)
    generator = SamAutomaticMaskGenerator(setup.model, points_per_side=None, point_grids=[grid])
    assert generator.point_grids[0].shape == (9, 2)
