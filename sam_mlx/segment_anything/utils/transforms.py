"""``segment_anything.utils.transforms.ResizeLongestSide`` on sam_mlx: the image resized so that its longest side
is ``target_length``, and coordinates mapped into that resized image (the encoder input's frame).

Coordinates it returns are marked as being in that frame: ``predict_torch`` and ``sam(batched_input)`` take them,
``SamPredictor.predict`` / ``predict_batch`` (original-image pixels) refuse them instead of giving wrong masks.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ...transforms import longest_side_shape, mark_input_frame, resize_image


class ResizeLongestSide:
    """Resize images and their point / box coordinates to a longest side of ``target_length`` (numpy, or torch
    tensors for the ``*_torch`` methods)."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """(H, W) with the longest side scaled to ``long_side_length``, rounded half up as the original."""
        return longest_side_shape(oldh, oldw, long_side_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 -> the resized image, H' x W' x 3 uint8 (PIL bilinear, as the original), a new writable
        array as the original's (which ``torch.as_tensor`` takes without a warning)."""
        image = np.asarray(image)
        return np.array(resize_image(image, self.get_preprocess_shape(image.shape[0], image.shape[1],
                                                                      self.target_length)))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """... x 2 (x, y) pixels of an ``original_size`` (H, W) image -> pixels of the resized image (float64)."""
        (old_h, old_w), (new_h, new_w) = original_size, self._new_size(original_size)
        coords = np.array(coords, dtype=float)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return mark_input_frame(coords)

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, ...]) -> np.ndarray:
        """B x 4 (x1, y1, x2, y2) boxes -> boxes of the resized image."""
        return mark_input_frame(np.asarray(self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size))
                                .reshape(-1, 4))

    def apply_image_torch(self, image: Any) -> Any:
        """B x C x H x W float tensor -> resized (torch's antialiased bilinear interpolation, which may differ from
        ``apply_image``'s PIL resize by a grey level). Sized from H and W; the original reads B and C there."""
        from torch.nn import functional

        size = self.get_preprocess_shape(image.shape[-2], image.shape[-1], self.target_length)
        return functional.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)

    def apply_coords_torch(self, coords: Any, original_size: tuple[int, ...]) -> Any:
        """``apply_coords`` for a torch tensor (float32, computed as the original does in torch)."""
        import torch

        (old_h, old_w), (new_h, new_w) = original_size, self._new_size(original_size)
        coords = copy.deepcopy(coords).to(torch.float)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return mark_input_frame(coords)

    def apply_boxes_torch(self, boxes: Any, original_size: tuple[int, ...]) -> Any:
        """``apply_boxes`` for a torch tensor."""
        return mark_input_frame(self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4))

    def _new_size(self, original_size: tuple[int, ...]) -> tuple[int, int]:
        return self.get_preprocess_shape(int(original_size[0]), int(original_size[1]), self.target_length)
