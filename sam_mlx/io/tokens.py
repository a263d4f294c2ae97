"""Image tokens on disk: encode an image once, prompt it later (in another process, another day).

A tokens file is a safetensors file holding ``tokens`` (1 x h x w x C, in the model's
dtype) and, in its metadata, the image geometry (original, input and padded sizes), the
predictor's sizing and size, the identity of the model that made them and a fingerprint of the
image's pixels. Tokens only make sense for the exact model, sizing and image that produced them, so
loading them into a predictor with another model or sizing, or for another image, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..transforms import ImageGeometry, image_geometry
from .atomic import atomic_write
from .images import as_rgb_array, pixel_fingerprint

FORMAT = "sam_mlx_image_tokens"
# 2: stretch sizing encodes at one scale for both axes (version 1's stretch tokens were made with
# squashed ViT position encodings, and are refused rather than decoded in the wrong frame).
# 3: the image's pixel fingerprint is stored, and checked against the image the tokens are used for.
FORMAT_VERSION = "3"


class ImageTokensError(ValueError):
    """A tokens file that is unreadable, not a tokens file, or made by another model, sizing or image."""


@dataclass(frozen=True)
class _CachedFingerprint:
    """The fingerprint with the ids of the parameter arrays it was computed from."""

    array_ids: tuple[int, ...]
    value: str


def model_fingerprint(model) -> str:
    """16 hex digits identifying a model: its config and every weight's name, shape, dtype and bytes.

    Every weight's bytes are hashed (SHA-256; hashlib releases the GIL, so one thread per core shares
    the work): changing any value of any weight changes the fingerprint. The result is cached on the
    model and recomputed when any parameter array is replaced (e.g. ``load_weights``).
    """
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    ids = tuple(id(v) for _, v in params)
    cached = getattr(model, "_sam_mlx_fingerprint", None)
    if isinstance(cached, _CachedFingerprint) and cached.array_ids == ids:
        return cached.value
    # row-major bytes, made here: the pool's threads only read memory (no MLX work, no MLX state in them)
    arrays = [v if memoryview(v).c_contiguous else mx.contiguous(v) for _, v in params]
    mx.eval(arrays)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        digests = list(pool.map(lambda v: hashlib.sha256(memoryview(v)).digest(), arrays))
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for (name, value), weight_digest in zip(params, digests):
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}:".encode() + weight_digest)
    value = digest.hexdigest()[:16]
    object.__setattr__(model, "_sam_mlx_fingerprint", _CachedFingerprint(ids, value))  # not a parameter
    return value


def model_identity(model) -> str:
    """Human-readable identity for messages: config name, weight dtypes (``q8``/``q4``: a quantized image encoder's
    Linear weights) and fingerprint."""
    dtypes = dict.fromkeys(str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters())
                           if mx.issubdtype(v.dtype, mx.floating))
    bits = model.config.encoder_bits
    return f"{model.config.name} {'+'.join(dtypes)}{f' q{bits}' if bits else ''} [{model_fingerprint(model)}]"


@dataclass(frozen=True)
class ImageTokensFile:
    """The contents of a tokens file. ``tokens`` is 1 x h x w x C with (h, w) = ``geometry.grid_size``."""

    tokens: mx.array
    geometry: ImageGeometry
    sizing: str
    size: int | tuple[int, int]
    model_fingerprint: str
    model_identity: str
    image_fingerprint: str
    image_name: str  # as given when saved ("" if none)

    def describe_image(self) -> str:
        return f"{self.image_name or 'an image'} [{self.image_fingerprint}]"


def save_image_tokens(predictor, path: str | Path, image_name: str | None = None) -> Path:
    """Write the predictor's current image tokens, geometry and image fingerprint to ``path`` (safetensors),
    atomically. ``image_name`` (e.g. the image's path) is kept to name the image in messages."""
    with predictor.lock:
        if not predictor.is_image_set:
            raise RuntimeError("no image set: call set_image(...) before save_image_tokens")
        if predictor.model.config.hq:
            raise ValueError(f"image tokens files hold the image tokens alone, and a {predictor.model.config.name} "
                             "model (HQ-SAM) also needs the encoder's early features: encode the image instead")
        geometry = predictor.geometry
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "original_size": json.dumps(list(geometry.original_size)),
            "input_size": json.dumps(list(geometry.input_size)),
            "padded_size": json.dumps(list(geometry.padded_size)),
            "sizing": predictor.sizing,
            "size": json.dumps(predictor.size),
            "model_fingerprint": model_fingerprint(predictor.model),
            "model_identity": model_identity(predictor.model),
            "image_fingerprint": predictor.image_fingerprint or "",
            "image_name": image_name or "",
        }
        tokens = {"tokens": predictor.features}
    return atomic_write(path, lambda tmp: mx.save_safetensors(tmp, tokens, metadata=metadata), suffix=".safetensors")


def read_image_tokens(path: str | Path) -> ImageTokensFile:
    """Read a tokens file written by ``save_image_tokens``, checking its format, shapes, dtype and values."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image tokens file not found: {path}")
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ImageTokensError(f"{path}: not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT or "tokens" not in arrays:
        raise ImageTokensError(f"{path}: not a sam_mlx image tokens file (from `sam-mlx encode` / save_image_tokens)")
    if metadata.get("format_version") != FORMAT_VERSION:
        version = metadata.get("format_version")
        raise ImageTokensError(f"{path}: image tokens format version {version!r}, expected {FORMAT_VERSION!r} "
                               "(encode the image again)")
    try:
        sizes = [tuple(int(v) for v in json.loads(metadata[k])) for k in ("original_size", "input_size", "padded_size")]
        size = json.loads(metadata["size"])
        result = ImageTokensFile(
            tokens=arrays["tokens"],
            geometry=ImageGeometry(*sizes),
            sizing=metadata["sizing"],
            size=tuple(size) if isinstance(size, list) else size,
            model_fingerprint=metadata["model_fingerprint"],
            model_identity=metadata["model_identity"],
            image_fingerprint=metadata["image_fingerprint"],
            image_name=metadata["image_name"],
        )
        planned = image_geometry(result.geometry.original_size, result.sizing, result.size)
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageTokensError(f"{path}: damaged image tokens metadata ({exc})") from None
    if planned != result.geometry:
        raise ImageTokensError(f"{path}: the stored geometry {result.geometry} is not what sizing {result.sizing!r} "
                               f"at size {result.size} gives an image of {result.geometry.original_size}: {planned}")
    tokens, expected = result.tokens, (1, *result.geometry.grid_size)
    if tokens.ndim != 4 or tuple(tokens.shape[:3]) != expected:
        raise ImageTokensError(
            f"{path}: tokens of shape {tuple(tokens.shape)} do not fit the {expected[1:]} token grid")
    if not mx.issubdtype(tokens.dtype, mx.floating):
        raise ImageTokensError(f"{path}: tokens of dtype {tokens.dtype}; image tokens are floating point")
    if not mx.isfinite(tokens).all().item():
        raise ImageTokensError(f"{path}: tokens with NaN or infinite values")
    return result


def load_image_tokens(predictor, path: str | Path, image: Any = None, image_name: str | None = None) -> ImageTokensFile:
    """Set the predictor's image from a tokens file, as ``set_image`` would.

    Refused for another model or sizing, for tokens the model's encoder cannot have made (channels, dtype)
    and, when ``image`` (a path, PIL image or array, named ``image_name`` in messages) is given, if the
    tokens were made from other pixels.
    """
    saved = read_image_tokens(path)
    mine = model_fingerprint(predictor.model)
    if saved.model_fingerprint != mine:
        raise ImageTokensError(
            f"{path}: image tokens were made by model {saved.model_identity}, "
            f"but this predictor's model is {model_identity(predictor.model)}; re-encode the image with this model"
        )
    if (saved.sizing, saved.size) != (predictor.sizing, predictor.size):
        raise ImageTokensError(
            f"{path}: image tokens were made with sizing {saved.sizing!r} at size {saved.size}, "
            f"but this predictor uses sizing {predictor.sizing!r} at size {predictor.size}"
        )
    channels = predictor.model.config.decoder.embed_dim
    dtype = predictor.model.encoder_dtype  # what its tokens come in
    if saved.tokens.shape[3] != channels or saved.tokens.dtype != dtype:
        raise ImageTokensError(f"{path}: tokens of {saved.tokens.shape[3]} channels in {saved.tokens.dtype}, but this "
                               f"model's encoder makes {channels} channels in {dtype}")
    if image is not None:
        fingerprint = pixel_fingerprint(as_rgb_array(image))
        if fingerprint != saved.image_fingerprint:
            name = image_name or (str(image) if isinstance(image, (str, Path)) else "the given image")
            raise ImageTokensError(f"{path}: image tokens were made from {saved.describe_image()}, not from "
                                   f"{name} [{fingerprint}]; encode this image")
    predictor.set_image_tokens(saved.tokens, saved.geometry, saved.image_fingerprint)
    return saved
