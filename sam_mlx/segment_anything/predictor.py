"""``segment_anything.SamPredictor`` on sam_mlx: sam_mlx's predictor (numpy ``predict``, the fast path) with the
original's torch-side names: ``set_torch_image``, ``predict_torch`` (coordinates already in the resized image's
frame), ``get_image_embedding`` as a 1 x 256 x 64 x 64 tensor, ``transform``, ``device``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import predictor as core
from ..modeling.sam import Sam
from ..transforms import ImageGeometry
from ._torch import CPU, Device, tensor_device, to_numpy, to_tensor, torch_installed
from .utils.transforms import ResizeLongestSide


class SamPredictor(core.SamPredictor):
    """``set_image`` once, then ``predict`` (original-image pixels, numpy) or ``predict_torch`` (transformed
    coordinates, torch) per prompt. ``features`` are sam_mlx's: 1 x 64 x 64 x 256 MLX tokens, channels last;
    ``get_image_embedding()`` gives them as the original does."""

    def __init__(self, sam_model: Sam) -> None:
        super().__init__(sam_model)
        self.transform = ResizeLongestSide(sam_model.config.image_size)

    @property
    def device(self) -> Device:
        return CPU

    def set_torch_image(self, transformed_image: Any, original_image_size: tuple[int, ...]) -> None:
        """Encode a 1 x 3 x H x W image already resized by ``transform`` (longest side ``img_size``; uint8 or
        float, tensor or array) of an ``original_image_size`` (H, W) image."""
        image = np.asarray(to_numpy(transformed_image))
        size = self.model.config.image_size
        if image.ndim != 4 or image.shape[:2] != (1, 3) or max(image.shape[2:]) != size:
            raise ValueError(f"set_torch_image takes a 1 x 3 x H x W image with longest side {size} "
                             f"(transform.apply_image's, channels first), got shape {image.shape}")
        self.set_input_image(image[0].transpose(1, 2, 0), original_image_size)

    @core._one_call_at_a_time
    def set_input_image(self, image: np.ndarray, original_size: tuple[int, ...]) -> None:
        """Encode an H x W x 3 image already resized (sides at most ``img_size``; it is padded, not resized) of an
        ``original_size`` (H, W) image."""
        size = self.model.config.image_size
        original = tuple(int(s) for s in original_size)
        if len(original) != 2 or min(original) < 1:
            raise ValueError(f"original_size must be (H, W), got {original_size!r}")
        if image.ndim != 3 or image.shape[2] != 3 or max(image.shape[:2]) > size or min(image.shape[:2]) < 1:
            raise ValueError(f"a resized image must be H x W x 3 with sides at most {size}, got {image.shape}")
        if not np.isfinite(image).all():
            raise ValueError("the image contains NaN or infinite values")
        geometry = ImageGeometry(original, tuple(image.shape[:2]), (size, size))
        self.reset_image()
        self._image = self._sam.encode_image(np.ascontiguousarray(image), geometry)

    @core._one_call_at_a_time
    def predict_torch(
        self,
        point_coords: Any,
        point_labels: Any,
        boxes: Any = None,
        mask_input: Any = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[Any, Any, Any]:
        """B prompts in the resized image's pixels (``transform.apply_coords_torch`` / ``apply_boxes_torch``):
        point_coords B x N x 2 with point_labels B x N, boxes B x 4, mask_input B x 1 x 256 x 256 ->
        (masks B x C x H x W, iou_predictions B x C, low_res_logits B x C x 256 x 256), torch tensors on the
        inputs' device (numpy arrays when no input is a tensor)."""
        labels = point_labels if point_coords is not None else None
        outputs = self.predict_input_frame(to_numpy(point_coords), to_numpy(labels), to_numpy(boxes),
                                           to_numpy(mask_input), multimask_output, return_logits)
        device = tensor_device(point_coords, point_labels, boxes, mask_input)
        return outputs if device is None else tuple(to_tensor(output, device) for output in outputs)

    @core._one_call_at_a_time
    def predict_input_frame(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask_output: bool,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``predict_torch`` in numpy: ``predict_batch`` with the coordinates in the resized image's pixels."""
        return self._decode_batch(point_coords, point_labels, boxes, mask_input, multimask_output, return_logits,
                                  return_low_res=True, hq_token_only=False, clip_boxes=False, input_frame=True)

    def get_image_embedding(self) -> Any:
        """The image tokens as the original returns them: 1 x C x h x w float32 (1 x 256 x 64 x 64), a torch
        tensor when torch is installed, else a numpy array."""
        embedding = super().get_image_embedding()
        return to_tensor(embedding) if torch_installed() else embedding
