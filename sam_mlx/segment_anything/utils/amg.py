"""``segment_anything.utils.amg`` on sam_mlx: the automatic mask generator's helpers (``sam_mlx.amg.mask_utils``,
numpy). The ones the original gives torch tensors take them too and then return tensors, on the same device.
``MaskData`` holds numpy arrays and lists (the original's holds tensors as well)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from ...amg import mask_utils
from ...amg.mask_utils import (
    MaskData,
    area_from_rle,
    batch_iterator,
    build_all_layer_point_grids,
    build_point_grid,
    coco_encode_rle,
    generate_crop_boxes,
    remove_small_regions,
    rle_to_mask,
)
from .._torch import is_tensor, to_numpy, to_tensor


def _tensors_as_given(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` on numpy; given a torch tensor first, it returns its array result as a tensor on that device."""

    @functools.wraps(function)
    def wrapper(values: Any, *args: Any) -> Any:
        result = function(to_numpy(values), *args)
        if is_tensor(values) and isinstance(result, np.ndarray):
            return to_tensor(result, values.device)
        return result

    return wrapper


is_box_near_crop_edge = _tensors_as_given(mask_utils.is_box_near_crop_edge)
box_xyxy_to_xywh = _tensors_as_given(mask_utils.box_xyxy_to_xywh)
calculate_stability_score = _tensors_as_given(mask_utils.calculate_stability_score)
uncrop_boxes_xyxy = _tensors_as_given(mask_utils.uncrop_boxes_xyxy)
uncrop_points = _tensors_as_given(mask_utils.uncrop_points)
uncrop_masks = _tensors_as_given(mask_utils.uncrop_masks)
batched_mask_to_box = _tensors_as_given(mask_utils.batched_mask_to_box)


def mask_to_rle_pytorch(tensor: Any) -> list[dict[str, Any]]:
    """N x H x W masks (a tensor or an array) -> N uncompressed RLEs (``mask_utils.mask_to_rle``)."""
    return mask_utils.mask_to_rle(to_numpy(tensor))


__all__ = [
    "MaskData",
    "area_from_rle",
    "batch_iterator",
    "batched_mask_to_box",
    "box_xyxy_to_xywh",
    "build_all_layer_point_grids",
    "build_point_grid",
    "calculate_stability_score",
    "coco_encode_rle",
    "generate_crop_boxes",
    "is_box_near_crop_edge",
    "mask_to_rle_pytorch",
    "remove_small_regions",
    "rle_to_mask",
    "uncrop_boxes_xyxy",
    "uncrop_masks",
    "uncrop_points",
]
