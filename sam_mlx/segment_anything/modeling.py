"""``segment_anything.modeling.Sam`` on sam_mlx: sam_mlx's ``Sam`` (an MLX module, the same weights and fast path)
with the original's model-level names: ``.to(device)``, ``.device``, ``image_encoder.img_size``,
``mask_threshold``, ``image_format``, ``preprocess``, ``postprocess_masks`` and the batched forward
``sam(batched_input, multimask_output)``."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from ..config import SamConfig
from ..modeling import sam as mlx_sam
from ..transforms import MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD, ImageGeometry, upscale_masks
from ._torch import CPU, Device, checked_device, is_tensor, tensor_device, to_numpy, to_tensor


class Sam(mlx_sam.Sam):
    """SAM as the original's model object; every sam_mlx API takes it as a plain ``sam_mlx.Sam``."""

    mask_threshold: float = MASK_THRESHOLD
    image_format: str = "RGB"

    def __init__(self, config: SamConfig):
        super().__init__(config)
        self.image_encoder.img_size = config.image_size  # a plain attribute, not a parameter

    @classmethod
    def from_model(cls, model: mlx_sam.Sam) -> Sam:
        """The same model (its arrays shared, not copied) with this class's names."""
        sam = cls(model.config)
        sam.update(model.parameters())
        return sam.eval()

    @property
    def device(self) -> Device:
        """"cpu": where the tensors this model returns live (MLX computes on its own device)."""
        return CPU

    def to(self, device: Any = None, dtype: Any = None, non_blocking: bool = False) -> Sam:
        """A no-op that accepts the original's devices ("cpu", "cuda", "mps", "gpu", a torch.device): MLX places
        the work itself. A dtype is refused: load the checkpoint with ``sam_mlx.load(path, dtype=...)``."""
        if dtype is not None or type(device).__name__ == "dtype":
            raise ValueError(f"Sam.to: a dtype ({dtype or device!r}) cannot be changed here; load the checkpoint "
                             "with sam_mlx.load(path, dtype='float16' | 'bfloat16' | 'float32') instead")
        if device is not None:
            checked_device(device)
        return self

    def preprocess(self, x: Any) -> Any:
        """The original's normalisation and padding: ... x 3 x H x W pixels (resized) -> ... x 3 x S x S float32,
        channels first as given (a tensor for a tensor)."""
        pixels = np.asarray(to_numpy(x), dtype=np.float32)
        size = self.config.image_size
        if pixels.ndim < 3 or pixels.shape[-3] != 3 or max(pixels.shape[-2:]) > size:
            raise ValueError(f"preprocess takes ... x 3 x H x W pixels with sides at most {size}, got {pixels.shape}")
        mean, std = (np.array(v, np.float32)[:, None, None] for v in (PIXEL_MEAN, PIXEL_STD))
        pad = [(0, 0)] * (pixels.ndim - 2) + [(0, size - pixels.shape[-2]), (0, size - pixels.shape[-1])]
        out = np.pad((pixels - mean) / std, pad)
        return to_tensor(out, tensor_device(x)) if is_tensor(x) else out

    def postprocess_masks(self, masks: Any, input_size: tuple[int, ...], original_size: tuple[int, ...]) -> Any:
        """The original's mask post-processing: B x C x h x w low-res logits -> B x C x H x W logits at
        ``original_size`` (upscaled to the padded input, cropped to ``input_size``, resized), a tensor for a
        tensor."""
        size = self.config.image_size
        geometry = ImageGeometry(tuple(int(s) for s in original_size), tuple(int(s) for s in input_size), (size, size))
        logits = np.array(upscale_masks(mx.array(np.asarray(to_numpy(masks), np.float32)), geometry))
        return to_tensor(logits, tensor_device(masks)) if is_tensor(masks) else logits

    def __call__(self, batched_input: list[dict[str, Any]], multimask_output: bool) -> list[dict[str, Any]]:
        """The original's batched forward: one dict per image in, one out.

        In: ``image`` (3 x H x W, already resized by ``ResizeLongestSide.apply_image``, uint8 or float, longest
        side at most ``image_encoder.img_size``), ``original_size`` (H, W), and any of ``point_coords`` (B x N x 2)
        with ``point_labels`` (B x N), ``boxes`` (B x 4), ``mask_inputs`` (B x 1 x 256 x 256), coordinates in the
        resized image's pixels (``apply_coords_torch`` / ``apply_boxes_torch``). Out: ``masks`` (B x C x H x W
        bool, at ``original_size``), ``iou_predictions`` (B x C), ``low_res_logits`` (B x C x 256 x 256): torch
        tensors on the image's device when the image is a tensor, numpy arrays otherwise. Images are encoded one
        at a time (the original encodes them as one batch: the same tokens).
        """
        from .predictor import SamPredictor

        predictor = SamPredictor(self)
        outputs = []
        for i, record in enumerate(batched_input):
            missing = {"image", "original_size"} - set(record)
            if missing:
                raise ValueError(f"batched_input[{i}] has no {sorted(missing)}: each image's dict needs 'image' "
                                 "(3 x H x W, resized) and 'original_size' (H, W)")
            image = np.asarray(to_numpy(record["image"]))
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"batched_input[{i}]['image'] must be 3 x H x W (channels first), got shape "
                                 f"{image.shape}")
            predictor.set_input_image(image.transpose(1, 2, 0), record["original_size"])
            coords = record.get("point_coords")
            labels = record.get("point_labels") if coords is not None else None
            masks, iou, low_res = predictor.predict_input_frame(
                to_numpy(coords), to_numpy(labels), to_numpy(record.get("boxes")), to_numpy(record.get("mask_inputs")),
                multimask_output,
            )
            outputs.append({"masks": masks, "iou_predictions": iou, "low_res_logits": low_res})
            if is_tensor(record["image"]):
                device = tensor_device(record["image"])
                outputs[-1] = {key: to_tensor(value, device) for key, value in outputs[-1].items()}
        return outputs
