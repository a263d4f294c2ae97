"""Segment everything: SAM's automatic mask generator on MLX.

A grid of single foreground points is decoded over the image (and optionally over
zoomed crops of it); each point gives three candidate masks. Candidates are kept when
the model's predicted IoU and the mask's stability score are high enough and their box
does not touch an inner crop edge; duplicates are removed by box NMS within each crop
and then between crops. Options, filters and output records are those of Meta's
``SamAutomaticMaskGenerator``; the model runs in MLX and the bookkeeping in numpy
(``mask_utils``), without torch, torchvision, OpenCV or pycocotools.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import numpy as np

from ..fast import EncodedImage, FastSam
from ..io.images import as_rgb_array
from ..modeling.sam import Sam
from ..transforms import MASK_THRESHOLD, checked_size, image_geometry
from . import mask_utils as mu

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
ProgressCallback = Callable[[int, int], None]

# Pixels of candidate masks upscaled at once (three bool masks each: 100 MB), e.g. 15 masks
# of a 1200 x 1800 crop.
_UPSCALE_PIXELS = 1 << 25


class SamAutomaticMaskGenerator:
    """Generate masks for everything in an image (``generate``).

    The options and their defaults are the original's (chosen for SAM ViT-H):
    ``points_per_side`` points a side on the grid (or explicit ``point_grids``, one
    N x 2 array in [0, 1] per crop layer), decoded ``points_per_batch`` at a time;
    masks are kept when predicted IoU > ``pred_iou_thresh`` and stability score
    (IoU of the mask thresholded at +-``stability_score_offset``) >=
    ``stability_score_thresh``; ``box_nms_thresh`` / ``crop_nms_thresh`` are the box
    IoU cutoffs for duplicates within / between crops; ``crop_n_layers`` adds layers of
    2**i x 2**i crops overlapping by ``crop_overlap_ratio``, sampled with
    ``crop_n_points_downscale_factor**i`` times fewer points a side;
    ``min_mask_region_area`` > 0 fills holes and drops islands smaller than that;
    ``output_mode`` is ``"binary_mask"``, ``"uncompressed_rle"`` or ``"coco_rle"``.
    ``sizing``/``size`` are those of ``SamPredictor``. SAM runs through the fast path (``FastSam``).
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        sizing: str = "original",
        size: int | tuple[int, int] | None = None,
    ):
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be at least 1, got {points_per_batch}")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        for name, value, high in (("pred_iou_thresh", pred_iou_thresh, 1.0),
                                  ("stability_score_thresh", stability_score_thresh, 1.0),
                                  ("box_nms_thresh", box_nms_thresh, 1.0), ("crop_nms_thresh", crop_nms_thresh, 1.0),
                                  ("crop_overlap_ratio", crop_overlap_ratio, 1.0),
                                  ("stability_score_offset", stability_score_offset, math.inf)):
            if not 0.0 <= value <= high:  # False for NaN, which would keep no mask and say nothing
                raise ValueError(f"{name} must be a number from 0 to {high:g}, got {value!r}")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")
        if points_per_side is not None:
            grids = mu.build_all_layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        else:
            grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(grids) < crop_n_layers + 1 or any(g.ndim != 2 or g.shape[1] != 2 for g in grids):
                raise ValueError(f"point_grids must hold one N x 2 array per crop layer ({crop_n_layers + 1})")
        self.point_grids = grids
        self.sizing, self.size = sizing, checked_size(sizing, model.config.image_size if size is None else size)
        self._sam = FastSam(model)
        self.lock = threading.RLock()  # one image's crops at a time, whichever threads call ``generate``
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode

    # ------------------------------------------------------------------ public
    def generate(self, image: Any, progress: ProgressCallback | None = None) -> list[dict[str, Any]]:
        """Masks for an image (H x W x 3 uint8 array, PIL image or path), as a list of records.

        Each record has ``segmentation`` (bool H x W array, or an RLE dict per
        ``output_mode``), ``area`` (pixels), ``bbox`` (XYWH), ``predicted_iou``,
        ``point_coords`` ([[x, y]], the prompt), ``stability_score`` and ``crop_box``
        (XYWH). ``progress(done, total)`` is called as point prompts are decoded.
        """
        image = as_rgb_array(image)
        with self.lock:
            data = self._generate_masks(image, progress)
        if self.min_mask_region_area > 0:
            nms_thresh = max(self.box_nms_thresh, self.crop_nms_thresh)
            data = self.postprocess_small_regions(data, self.min_mask_region_area, nms_thresh)
        return [self._record(data, i) for i in range(len(data["rles"]))]

    # ----------------------------------------------------------------- helpers
    def _generate_masks(self, image: np.ndarray, progress: ProgressCallback | None) -> mu.MaskData:
        orig_size = image.shape[:2]
        crop_boxes, layers = mu.generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        total = sum(len(self.point_grids[layer]) for layer in layers)
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        tick(0)
        data = mu.MaskData()
        for crop_box, layer in zip(crop_boxes, layers):
            data.cat(self._process_crop(image, crop_box, layer, orig_size, tick))

        if len(crop_boxes) > 1:  # duplicates between crops: prefer masks from smaller crops
            scores = np.float32(1) / mu.box_area(data["crop_boxes"]).astype(np.float32)
            keep = mu.batched_box_nms(
                data["boxes"].astype(np.float32), scores, np.zeros(len(scores)), self.crop_nms_thresh
            )
            data.filter(keep)
        return data

    def _process_crop(
        self,
        image: np.ndarray,
        crop_box: list[int],
        layer: int,
        orig_size: tuple[int, int],
        tick: Callable[[int], None],
    ) -> mu.MaskData:
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1]
        encoded = self._sam.encode_image(crop, image_geometry(crop.shape[:2], self.sizing, self.size))
        points = self.point_grids[layer] * np.array(crop.shape[:2])[None, ::-1]

        data = mu.MaskData()
        for (batch,) in mu.batch_iterator(self.points_per_batch, points):
            data.cat(self._process_batch(encoded, batch, crop_box, orig_size))
            tick(len(batch))

        keep = mu.batched_box_nms(
            data["boxes"].astype(np.float32), data["iou_preds"], np.zeros(len(data["rles"])), self.box_nms_thresh
        )
        data.filter(keep)
        data["boxes"] = mu.uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = mu.uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = np.tile(np.asarray(crop_box, dtype=np.int64), (len(data["rles"]), 1))
        return data

    def _process_batch(
        self, image: EncodedImage, points: np.ndarray, crop_box: list[int], orig_size: tuple[int, int]
    ) -> mu.MaskData:
        """Decode one batch of grid points (crop pixels) and keep the good, whole masks."""
        crop_size = image.geometry.original_size
        prompts = (mx.array(image.geometry.to_input_coords(points[:, None, :])), mx.ones((len(points), 1), mx.int32))
        low_res, iou = self._sam.decode(image, prompts, None, None, multimask_output=True, read_grid_only=True)
        low_res = low_res.reshape(-1, *low_res.shape[-2:])  # (points x 3) masks, point-major
        iou = iou.reshape(-1)
        points = np.repeat(points, len(iou) // len(points), axis=0)

        # Upscaling is per mask, so dropping low predicted IoUs first changes nothing.
        keep = np.flatnonzero(iou > self.pred_iou_thresh) if self.pred_iou_thresh > 0.0 else np.arange(len(iou))
        kept, stability, masks = [np.zeros(0, np.int64)], [np.zeros(0, np.float32)], [np.zeros((0, *crop_size), bool)]
        step = max(1, _UPSCALE_PIXELS // (crop_size[0] * crop_size[1]))
        for start in range(0, len(keep), step):
            chunk = keep[start : start + step]
            score, binary = self._stability_and_masks(image, low_res[chunk])
            if self.stability_score_thresh > 0.0:
                stable = score >= self.stability_score_thresh
                chunk, score, binary = chunk[stable], score[stable], binary[stable]
            kept.append(chunk)
            stability.append(score)
            masks.append(binary)
        kept, stability, masks = np.concatenate(kept), np.concatenate(stability), np.concatenate(masks)
        data = mu.MaskData(iou_preds=iou[kept], points=points[kept], stability_score=stability)

        boxes = mu.batched_mask_to_box(masks)
        inside = ~mu.is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_size[1], orig_size[0]])
        data.filter(inside)
        data["boxes"] = boxes[inside]
        data["rles"] = [mu.mask_to_rle(mu.uncrop_masks(m[None], crop_box, *orig_size))[0] for m in masks[inside]]
        return data

    def _stability_and_masks(self, image: EncodedImage, low_res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """K low-res logits -> (stability scores K float32, binary masks K x H x W at the crop size).

        The masks at the three thresholds are the original's upscaled logits compared with
        each (``FastSam.masks_above``); the pixel counts are exact.
        """
        offset = self.stability_score_offset
        inner, masks, outer = self._sam.masks_above(
            image, low_res, (MASK_THRESHOLD + offset, MASK_THRESHOLD, MASK_THRESHOLD - offset)
        )
        return mu.stability_score_of_masks(inner, outer), masks

    @staticmethod
    def postprocess_small_regions(data: mu.MaskData, min_area: int, nms_thresh: float) -> mu.MaskData:
        """Fill small holes and drop small islands, then NMS again preferring untouched masks."""
        if not data["rles"]:
            return data
        changed, boxes = {}, []
        for i, rle in enumerate(data["rles"]):
            mask, filled = mu.remove_small_regions(mu.rle_to_mask(rle), min_area, mode="holes")
            mask, dropped = mu.remove_small_regions(mask, min_area, mode="islands")
            if filled or dropped:
                changed[i] = mask
            boxes.append(mu.batched_mask_to_box(mask[None])[0])
        boxes = np.stack(boxes)
        scores = np.array([i not in changed for i in range(len(boxes))], dtype=np.float32)
        keep = mu.batched_box_nms(boxes.astype(np.float32), scores, np.zeros(len(scores)), nms_thresh)
        for i in keep[scores[keep] == 0.0]:
            data["rles"][i] = mu.mask_to_rle(changed[i][None])[0]
            data["boxes"][i] = boxes[i]
        data.filter(keep)
        return data

    def _record(self, data: mu.MaskData, i: int) -> dict[str, Any]:
        rle = data["rles"][i]
        if self.output_mode == "binary_mask":
            segmentation = mu.rle_to_mask(rle)
        elif self.output_mode == "coco_rle":
            segmentation = mu.coco_encode_rle(rle)
        else:
            segmentation = rle
        return {
            "segmentation": segmentation,
            "area": mu.area_from_rle(rle),
            "bbox": mu.box_xyxy_to_xywh(data["boxes"][i]).tolist(),
            "predicted_iou": float(data["iou_preds"][i]),
            "point_coords": [data["points"][i].tolist()],
            "stability_score": float(data["stability_score"][i]),
            "crop_box": mu.box_xyxy_to_xywh(data["crop_boxes"][i]).tolist(),
        }
