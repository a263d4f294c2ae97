"""Turn what users pass as an image (path, PIL image, numpy array) into H x W x 3 uint8 RGB."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as H x W x 3 uint8 RGB, in the orientation its EXIF tag says it is seen."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return _read_rgb(path, str(path), " Raise PIL.Image.MAX_IMAGE_PIXELS to accept it.")


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """An image file's bytes (e.g. fetched over HTTP) -> H x W x 3 uint8 RGB, EXIF-rotated; errors name ``name``."""
    return _read_rgb(io.BytesIO(data), name)


def _read_rgb(source: Path | BinaryIO, name: str, bomb_advice: str = "") -> np.ndarray:
    """Open, decode and convert an image file; one ValueError naming ``name`` if it is not a readable image or is
    over Pillow's pixel limit (``bomb_advice`` appended to that message)."""
    try:
        with Image.open(source) as im:
            im.load()
            return pil_to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{name}: {exc}{bomb_advice}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{name}: not a readable image ({exc})") from exc


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) -> H x W x 3 uint8 RGB, EXIF-rotated.

    Transparent pixels are composited over white; integer grayscale (I;16* and I, how some
    Pillow versions open 16-bit PNGs) is taken as 16-bit and scaled to 8 bits, clipped to
    0..65535; float images are taken as 0..1 when their maximum is at most 1, else as 0..255.
    """
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        else:  # the same scale whatever the values, so one pixel value always gives one gray
            scale = 1.0 / 257.0
        gray = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def as_rgb_array(image: Any) -> np.ndarray:
    """Accept a path, a PIL image or an H x W x 3 uint8 array; return H x W x 3 uint8 RGB."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be H x W x 3 (RGB), got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"image array must be uint8 (0..255), got dtype {image.dtype}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"image array is empty: shape {image.shape}")
        return np.ascontiguousarray(image)
    raise TypeError(f"image must be a path, a PIL image or a numpy array, got {type(image).__name__}")


def pixel_fingerprint(image: np.ndarray) -> str:
    """16 hex digits identifying an H x W x 3 uint8 image by its decoded pixels (SHA-256 of size and bytes)."""
    digest = hashlib.sha256(f"{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()[:16]
