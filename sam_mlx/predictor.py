"""SamPredictor: the original predictor API (``set_image`` once, ``predict`` per prompt) on MLX.

The image encoder runs once in ``set_image`` and its tokens are kept; each ``predict`` then only
runs the prompt encoder, the small mask decoder and the upscaling of the chosen masks to the
image's size. The predictor checks its inputs and maps them between the image and the encoder
input; SAM itself runs through the fast path (``sam_mlx.fast.FastSam``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import mlx.core as mx
import numpy as np

from .fast import EncodedImage, FastSam
from .io.images import as_rgb_array, pixel_fingerprint
from .modeling.prompt_encoder import PADDING_LABEL, prompt_batch_size
from .modeling.sam import Sam
from .ops import backend
from .resources import check_encoding_fits
from .transforms import MASK_THRESHOLD, ImageGeometry, checked_size, image_geometry, in_input_frame

# SAM's low-res logits lie within about +-100; far larger hints would overflow float32 in the hint encoder
_MASK_INPUT_LIMIT = 1e6
_Method = TypeVar("_Method", bound=Callable[..., Any])


def _one_call_at_a_time(method: _Method) -> _Method:
    """Run the method holding the predictor's ``lock``: calls from several threads take turns."""

    @functools.wraps(method)
    def locked(self: SamPredictor, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class SamPredictor:
    """Segment one image with many prompts.

    ``sizing``/``size``: ``"original"`` (default: longest side resized to 1024 and padded,
    exactly as Meta's SAM) or ``"stretch"`` (resized to multiples of 16, no padding).

    Any thread may call it, several threads too: each call holds ``lock`` (hold it yourself to make a
    sequence of calls, such as ``set_image`` then ``predict``, one). Several predictors, one per thread,
    compute at the same time.
    """

    def __init__(self, model: Sam, sizing: str = "original", size: int | tuple[int, int] | None = None):
        self.lock = threading.RLock()
        self.model = model
        self.sizing = sizing
        self.size = checked_size(sizing, model.config.image_size if size is None else size)
        widest = image_geometry((1, 1), sizing, self.size)
        if sizing == "stretch" and isinstance(self.size, int):  # the largest grid an image can get: a square
            widest = image_geometry((self.size, self.size), sizing, self.size)
        check_encoding_fits(model.config, widest.padded_size, backend.on_cpu())
        self._sam = FastSam(model)
        self.reset_image()

    # ---------------------------------------------------------------- image
    @_one_call_at_a_time
    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """Encode an image (H x W x 3 uint8 array, PIL image or path) and keep its tokens."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        array = as_rgb_array(image)
        if image_format == "BGR":
            array = np.ascontiguousarray(array[..., ::-1])
        geometry = image_geometry(array.shape[:2], self.sizing, self.size)
        self.reset_image()  # the last image's tokens are not kept while the next one is encoded
        self._image = self._sam.encode_image(array, geometry)
        self.image_fingerprint = pixel_fingerprint(array)

    @_one_call_at_a_time
    def set_image_tokens(self, tokens: mx.array, geometry: ImageGeometry, image_fingerprint: str | None = None) -> None:
        """Use already computed image tokens (1 x h x w x C) for an image of ``geometry`` (whose pixels have
        ``io.images.pixel_fingerprint`` ``image_fingerprint``, if known)."""
        expected = (1, *geometry.grid_size)
        if tuple(tokens.shape[:3]) != expected:
            raise ValueError(f"image tokens of shape {tuple(tokens.shape)} do not fit a {expected[1:]} token grid")
        self._image = self._sam.prepare(tokens, geometry)
        self.image_fingerprint = image_fingerprint

    @_one_call_at_a_time
    def reset_image(self) -> None:
        self._image: EncodedImage | None = None
        self.image_fingerprint: str | None = None

    @property
    def is_image_set(self) -> bool:
        return self._image is not None

    @property
    def encoded_image(self) -> EncodedImage:
        """The image as the fast path keeps it, to decode it with ``sam_mlx.fast.FastSam`` directly (hold ``lock``
        meanwhile)."""
        return self._require_image()

    @property
    def features(self) -> mx.array:
        """The image tokens, 1 x h x w x C (channels-last)."""
        return self._require_image().tokens

    @property
    def geometry(self) -> ImageGeometry:
        return self._require_image().geometry

    @property
    def original_size(self) -> tuple[int, int]:
        return self.geometry.original_size

    @property
    def input_size(self) -> tuple[int, int]:
        return self.geometry.input_size

    @_one_call_at_a_time
    def get_image_embedding(self) -> np.ndarray:
        """The image tokens as the original returns them: 1 x C x h x w float32."""
        return np.array(self.features.astype(mx.float32)).transpose(0, 3, 1, 2)

    def _require_image(self) -> EncodedImage:
        if self._image is None:
            raise RuntimeError("no image set: call set_image(...) before predict or get_image_embedding")
        return self._image

    # ---------------------------------------------------------------- prompts
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        return_low_res: bool = True,
        hq_token_only: bool = False,
        clip_boxes: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One prompt -> (masks C x H x W, iou_predictions C, low_res_logits C x h x w), numpy.

        point_coords: N x 2 (x, y) pixels of the original image, point_labels: N (1 = foreground,
        0 = background, -1 = padding, ignored); box: 4 (x1, y1, x2, y2); mask_input: 1 x h x w
        low-res logits from a previous prediction. C is 3 with ``multimask_output`` else 1.
        A box partly outside the image is used as given, as the original does (``clip_boxes=True`` clips it
        to the image first); points outside the image are refused.
        ``return_low_res=False``: no low-res logits (None); the masks of the padding's tokens, which
        only they show, are then not computed (``ImageGeometry.read_grid``; a 3:2 photo: 1/3 of the tokens).
        HQ-SAM, as its original predictor: C is 1 (SAM's best mask of the three with ``multimask_output``, else
        mask 0, plus the HQ mask; the HQ mask alone with ``hq_token_only``).
        """
        _refuse_input_frame(point_coords=point_coords, box=box)
        if point_coords is not None or point_labels is not None:
            coords, labels = _points(point_coords, point_labels)
            point_coords, point_labels = coords[None], labels[None]
        if box is not None:
            box = np.asarray(box, dtype=np.float64)
            if box.size != 4:
                raise ValueError(f"box must have 4 numbers (x1, y1, x2, y2), got shape {box.shape}")
            box = box.reshape(1, 4)
        if mask_input is not None:
            mask_input = np.asarray(mask_input)
            if mask_input.ndim != 3 or mask_input.shape[0] != 1:
                raise ValueError(
                    f"mask_input must be 1 x h x w: one low-res mask of a previous prediction (e.g. low_res[[i]]), "
                    f"got shape {mask_input.shape}"
                )
            mask_input = mask_input[None]
        masks, iou, low_res = self.predict_batch(
            point_coords, point_labels, box, mask_input, multimask_output, return_logits, return_low_res, hq_token_only,
            clip_boxes,
        )
        return masks[0], iou[0], None if low_res is None else low_res[0]

    @_one_call_at_a_time
    def predict_batch(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        return_low_res: bool = True,
        hq_token_only: bool = False,
        clip_boxes: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """B prompts decoded together -> (masks B x C x H x W, iou B x C, low_res B x C x h x w).

        point_coords: B x N x 2, point_labels: B x N, boxes: B x 4, mask_input: B x 1 x h x w,
        all in the original image's pixels (not the encoder input's, which ``ResizeLongestSide`` gives and
        ``segment_anything.SamPredictor.predict_torch`` takes: such coordinates are refused); whichever are given
        must agree on B. Prompts with fewer points are padded with label -1. B = 0 gives empty arrays.
        ``return_low_res``, ``hq_token_only``, ``clip_boxes``: as ``predict``.
        """
        _refuse_input_frame(point_coords=point_coords, boxes=boxes)
        return self._decode_batch(point_coords, point_labels, boxes, mask_input, multimask_output, return_logits,
                                  return_low_res, hq_token_only, clip_boxes, input_frame=False)

    def _decode_batch(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: np.ndarray | None,
        multimask_output: bool,
        return_logits: bool,
        return_low_res: bool,
        hq_token_only: bool,
        clip_boxes: bool,
        input_frame: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``predict_batch`` with the coordinates in the original image's pixels, or with ``input_frame`` in the
        resized image's (the encoder input's, as the original's ``predict_torch`` takes them)."""
        image = self._require_image()
        if hq_token_only and not self.model.config.hq:
            raise ValueError(f"hq_token_only needs an HQ-SAM model; a {self.model.config.name} model has no HQ token")
        prompts = self._prepare_prompts(point_coords, point_labels, boxes, mask_input, clip_boxes, input_frame)
        if prompt_batch_size(*prompts) == 0:
            return self._no_masks(multimask_output, return_logits, return_low_res)
        low_res, iou = self._sam.decode(image, *prompts, multimask_output, read_grid_only=not return_low_res,
                                        hq_token_only=hq_token_only)
        if return_logits:
            masks = self._sam.upscale(image, low_res)
        else:
            masks = self._sam.masks_above(image, low_res, (MASK_THRESHOLD,))[0]
        return masks, iou, low_res if return_low_res else None

    def _no_masks(
        self, multimask_output: bool, return_logits: bool, return_low_res: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The empty result of a batch of 0 prompts, shaped like a non-empty one."""
        count = 3 if multimask_output and not self.model.config.hq else 1
        grid_h, grid_w = self.geometry.grid_size
        masks = np.zeros((0, count, *self.geometry.original_size), np.float32 if return_logits else bool)
        low_res = np.zeros((0, count, 4 * grid_h, 4 * grid_w), np.float32) if return_low_res else None
        return masks, np.zeros((0, count), np.float32), low_res

    def _prepare_prompts(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        boxes: np.ndarray | None,
        mask_input: np.ndarray | None,
        clip_boxes: bool,
        input_frame: bool,
    ) -> tuple[tuple[mx.array, mx.array] | None, mx.array | None, mx.array | None]:
        """Check batched prompts against the image and move them to encoder-input coordinates (unless they are
        there already: ``input_frame``)."""
        geometry = self.geometry
        h, w = geometry.input_size if input_frame else geometry.original_size
        to_input = (lambda c: np.asarray(c, np.float32)) if input_frame else geometry.to_input_coords
        frame = f"{w}x{h} resized image" if input_frame else f"{w}x{h} image"
        batch_sizes = {}
        points = None
        if point_coords is not None or point_labels is not None:
            coords, labels = _points(point_coords, point_labels, batched=True)
            outside = (labels != PADDING_LABEL) & (
                (coords[..., 0] < 0) | (coords[..., 0] > w) | (coords[..., 1] < 0) | (coords[..., 1] > h)
            )
            if outside.any():
                x, y = coords[outside][0]
                raise ValueError(f"point ({x:g}, {y:g}) is outside the {frame} (x in 0..{w}, y in 0..{h})")
            batch_sizes["point_coords"] = coords.shape[0]
            points = (mx.array(to_input(coords)), mx.array(labels))
        box_array = None
        if boxes is not None:
            boxes = _boxes(boxes, w, h, clip_boxes, frame)
            batch_sizes["boxes"] = boxes.shape[0]
            box_array = mx.array(to_input(boxes.reshape(-1, 2, 2)).reshape(-1, 4))
        masks = None
        if mask_input is not None:
            masks = self._mask_input(mask_input)
            batch_sizes["mask_input"] = masks.shape[0]
        if not batch_sizes:
            raise ValueError("no prompt: give point_coords with point_labels, a box, or a mask_input")
        if len(set(batch_sizes.values())) > 1:
            raise ValueError(f"prompt batch sizes differ: {batch_sizes}")
        if points is not None and box_array is None and masks is None:
            only_padding = np.flatnonzero((labels == PADDING_LABEL).all(axis=1))
            if only_padding.size:
                raise ValueError(f"prompt {only_padding[0]} has only padding points (label -1), no box and no mask")
        return points, box_array, masks

    def _mask_input(self, mask_input: np.ndarray) -> mx.array:
        grid_h, grid_w = self.geometry.grid_size
        expected = (1, 4 * grid_h, 4 * grid_w)
        mask_input = np.asarray(mask_input)
        if mask_input.ndim != 4 or mask_input.shape[1:] != expected:
            raise ValueError(
                f"mask_input must be B x {' x '.join(map(str, expected))} low-res logits, got {mask_input.shape}"
            )
        if not np.isfinite(mask_input).all():
            raise ValueError("mask_input contains NaN or infinite values")
        largest = float(np.abs(mask_input).max(initial=0))
        if largest > _MASK_INPUT_LIMIT:  # e.g. a float64 1e300: inf in float32, NaN masks after
            raise ValueError(f"mask_input values must lie within +-{_MASK_INPUT_LIMIT:g} (low-res logits), "
                             f"got {largest:g}")
        return mx.array(mask_input[:, 0].astype(np.float32))


def _refuse_input_frame(**coordinates: Any) -> None:
    """Refuse coordinates ``ResizeLongestSide`` mapped to the encoder input: they would give wrong masks silently."""
    for name, value in coordinates.items():
        if in_input_frame(value):
            raise ValueError(
                f"{name} were transformed to the encoder input's frame (ResizeLongestSide.apply_*), but predict "
                "and predict_batch take the original image's pixels: pass the untransformed ones, or the "
                "transformed ones to sam_mlx.segment_anything.SamPredictor.predict_torch"
            )


def _points(coords: Any, labels: Any, batched: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Validate point prompts: N x 2 and N (or B x N x 2 and B x N when ``batched``)."""
    if coords is None or labels is None:
        raise ValueError("point_coords and point_labels must be given together")
    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(labels)
    ndim = 3 if batched else 2
    if coords.ndim != ndim or coords.shape[-1] != 2:
        want = "B x N x 2" if batched else "N x 2"
        raise ValueError(f"point_coords must be {want} (x, y) pixels, got shape {coords.shape}")
    if labels.shape != coords.shape[:-1]:
        raise ValueError(f"point_labels has shape {labels.shape} but point_coords has {coords.shape[:-1]} points")
    if coords.shape[-2] == 0:
        raise ValueError("point_coords is empty")
    if not np.isfinite(coords).all():
        raise ValueError("point_coords contains NaN or infinite values")
    bad = ~np.isin(labels, (0, 1, PADDING_LABEL))
    if bad.any():
        raise ValueError(
            f"point_labels must be 1 (foreground), 0 (background) or -1 (padding), got {labels[bad][0].item()!r}"
        )
    return coords, labels.astype(np.int32)


def _boxes(boxes: Any, w: int, h: int, clip: bool, frame: str) -> np.ndarray:
    """Validate B x 4 (x1, y1, x2, y2) boxes; with ``clip``, clip them to the w x h image (``frame`` names it).

    A box partly outside the image is kept as given by default, as the original takes it (detector boxes often
    cross the border, and SAM reads the corners' positions, not only the pixels inside): clipping it moves a
    corner, and so the mask. A box wholly outside the image, inverted or not finite is refused."""
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim == 1:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be B x 4 (x1, y1, x2, y2), got shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError("box contains NaN or infinite values")
    for x1, y1, x2, y2 in boxes:
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has x2 < x1 or y2 < y1")
        if x2 < 0 or y2 < 0 or x1 > w or y1 > h:
            raise ValueError(f"box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the {frame}")
    return np.clip(boxes, 0, [w, h, w, h]) if clip else boxes
