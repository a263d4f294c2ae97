"""Image sizing, normalisation, coordinate transforms and mask post-processing between the image and the model.

Two sizings:
- ``original`` (default, as Meta's SAM): resize so the longest side is ``size`` (1024),
  normalise, pad bottom/right with zeros to ``size x size``.
- ``stretch``: resize to a grid whose sides are multiples of 16 and no padding, either
  keeping the aspect ratio with the longest side at ``size`` or to an explicit (H, W).
  Position encodings and relative-position tables are resized to the grid's longest side
  and cropped to the grid (one scale for both axes; see ``image_encoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from .modeling.common import linear_resize_matrix, linear_taps

PATCH = 16
SIZINGS = ("original", "stretch")
PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet's, in 0..255, as SAM was trained
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0  # a mask is where its upscaled logits are above this


@dataclass(frozen=True)
class ImageGeometry:
    """Where an image sits in the encoder input: sizes are (H, W)."""

    original_size: tuple[int, int]  # the user's image
    input_size: tuple[int, int]  # the resized image inside the encoder input
    padded_size: tuple[int, int]  # the encoder input (multiple of 16)

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.padded_size[0] // PATCH, self.padded_size[1] // PATCH

    @property
    def read_grid(self) -> tuple[int, int]:
        """The token rows x columns, from the top left, whose masks the post-processing reads.

        Low-res masks (4 x 4 pixels per token) are upscaled to the padded input and cropped to
        ``input_size``: the last kept pixel's upper interpolation tap is the last low-res sample read.
        Tokens past it are padding that only the low-res logits show.
        """
        return tuple(  # type: ignore[return-value]
            int(linear_taps(4 * tokens, padded)[1][valid - 1]) // 4 + 1
            for valid, tokens, padded in zip(self.input_size, self.grid_size, self.padded_size)
        )

    def to_input_coords(self, coords: np.ndarray) -> np.ndarray:
        """... x 2 (x, y) pixels of the original image -> pixels of the resized image."""
        (oh, ow), (h, w) = self.original_size, self.input_size
        coords = np.asarray(coords, dtype=np.float64).copy()
        coords[..., 0] *= w / ow
        coords[..., 1] *= h / oh
        return coords.astype(np.float32)

    def to_original_coords(self, coords: np.ndarray) -> np.ndarray:
        """Inverse of ``to_input_coords``."""
        (oh, ow), (h, w) = self.original_size, self.input_size
        coords = np.asarray(coords, dtype=np.float64).copy()
        coords[..., 0] *= ow / w
        coords[..., 1] *= oh / h
        return coords.astype(np.float32)


def longest_side_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """(H, W) after scaling the longest side to ``long_side``, rounded as the original.

    A side that would round to 0 (aspect ratio beyond 2 * long_side : 1) is kept at 1 pixel:
    the original fails there, and a 0-pixel side has no pixels to resize or map back to.
    """
    scale = long_side / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def image_geometry(
    original_size: tuple[int, int], sizing: str = "original", size: int | tuple[int, int] = 1024
) -> ImageGeometry:
    """Plan the resize of an (H, W) image for ``sizing`` at ``size``."""
    h, w = original_size
    if h < 1 or w < 1:
        raise ValueError(f"image size must be at least 1x1, got {w}x{h}")
    if sizing not in SIZINGS:
        raise ValueError(f"sizing must be one of {SIZINGS}, got {sizing!r}")
    if sizing == "original":
        if not isinstance(size, int) or size % PATCH or size < PATCH:
            raise ValueError(f"original sizing needs a square size that is a multiple of {PATCH}, got {size!r}")
        return ImageGeometry((h, w), longest_side_shape(h, w, size), (size, size))
    if isinstance(size, int):
        if size < PATCH:
            raise ValueError(f"stretch size must be at least {PATCH}, got {size}")
        target = longest_side_shape(h, w, size)
        target = tuple(max(PATCH, round(s / PATCH) * PATCH) for s in target)
    else:
        target = tuple(int(s) for s in size)
        if len(target) != 2 or any(s < PATCH or s % PATCH for s in target):
            raise ValueError(f"stretch size (H, W) must be multiples of {PATCH}, got {size!r}")
    return ImageGeometry((h, w), target, target)


def checked_size(sizing: str, size: Any) -> int | tuple[int, int]:
    """A size as given (an integer or a pair, numpy types too) -> int or tuple of two ints, valid for ``sizing``."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = int(size)
    elif isinstance(size, (tuple, list, np.ndarray)) and len(size) == 2 and all(
        isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size
    ):
        size = int(size[0]), int(size[1])
    else:
        raise ValueError(f"size must be an integer or a (height, width) pair of integers, got {size!r}")
    image_geometry((1, 1), sizing, size)  # raises for a sizing it does not fit
    return size


class InputFrameCoords(np.ndarray):
    """Coordinates already mapped to the resized image (the encoder input's frame), as ``ResizeLongestSide`` returns
    them: the predictor's ``predict`` and ``predict_batch``, which take the original image's pixels, refuse them."""


_INPUT_FRAME = "_sam_mlx_input_frame"  # the same mark on a torch tensor, which cannot be subclassed here


def mark_input_frame(coords: Any) -> Any:
    """Mark a numpy array or torch tensor of coordinates as being in the encoder input's frame."""
    if isinstance(coords, np.ndarray):
        return coords.view(InputFrameCoords)
    setattr(coords, _INPUT_FRAME, True)
    return coords


def in_input_frame(coords: Any) -> bool:
    """Whether ``mark_input_frame`` marked these coordinates."""
    return isinstance(coords, InputFrameCoords) or getattr(coords, _INPUT_FRAME, False) is True


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x 3 uint8 -> the (H', W') image, PIL bilinear (as the original's torchvision resize of a PIL image)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR))


def preprocess(image: np.ndarray, geometry: ImageGeometry) -> mx.array:
    """H x W x 3 uint8 RGB -> 1 x H' x W' x 3 normalized float32 encoder input.

    Resizes with PIL bilinear (``resize_image``), normalises with the ImageNet mean/std and zero-pads
    bottom/right. An image already at ``geometry.input_size`` is not resized (and may then be float).
    """
    h, w = geometry.input_size
    image = resize_image(image, (h, w))
    x = (image.astype(np.float32) - np.array(PIXEL_MEAN, np.float32)) / np.array(PIXEL_STD, np.float32)
    ph, pw = geometry.padded_size
    x = np.pad(x, ((0, ph - h), (0, pw - w), (0, 0)))
    return mx.array(x[None])


@lru_cache(maxsize=64)
def mask_resize_matrix(low_res: int, padded: int, valid: int, original: int) -> np.ndarray:
    """(original, low_res) matrix: upscale to ``padded``, keep the first ``valid``, resize to ``original``.

    SAM's mask post-processing (two bilinear interpolations and a crop) folded into one matrix per
    axis. Like each interpolation, its rows are non-negative and sum to 1: every output is a weighted
    mean of its inputs. The second interpolation is applied as its two taps per row, not as a matrix
    product through numpy's BLAS, whose threads spin on after a multi-threaded product.
    """
    up = linear_resize_matrix(low_res, padded)[:valid].astype(np.float64)
    lo, hi, frac = linear_taps(valid, original)
    return ((1.0 - frac)[:, None] * up[lo] + frac[:, None] * up[hi]).astype(np.float32)


def upscale_masks(low_res: mx.array, geometry: ImageGeometry) -> mx.array:
    """SAM's mask post-processing: ... x 4h x 4w low-res logits -> ... x H x W logits at the image's size.

    Bilinearly upscaled to the padded encoder input, cropped to the resized image, bilinearly resized to
    the image: ``Ry @ logits @ Rx.T``. The predictor computes the same band by band, and for binary masks
    only at their edges (``fast.masks``).
    """
    axes = zip(low_res.shape[-2:], geometry.padded_size, geometry.input_size, geometry.original_size)
    rows, cols = (mx.array(mask_resize_matrix(*axis)) for axis in axes)
    return rows @ low_res.astype(mx.float32) @ cols.T
