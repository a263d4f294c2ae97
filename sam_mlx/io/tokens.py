"""Image tokens on disk: encode an image once, prompt it later (in another process, another day).

A tokens file is a safetensors file holding ``tokens`` (1 x h x w x C, in the model's
dtype) and, in its metadata, the image geometry (original, input and padded sizes), the
predictor's sizing and size, and the identity of the model that made them. Tokens only
make sense for the exact model and sizing that produced them, so loading them into a
predictor with another model or sizing is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..transforms import ImageGeometry
from .atomic import atomic_write

FORMAT = "sam_mlx_image_tokens"
# 2: stretch sizing encodes at one scale for both axes (version 1's stretch tokens were made with
# squashed ViT position encodings, and are refused rather than decoded in the wrong frame).
FORMAT_VERSION = "2"
_SAMPLED_WEIGHTS = 8  # weights whose values enter the fingerprint (all names, shapes and dtypes do)


class ImageTokensError(ValueError):
    """A tokens file that is unreadable, not a tokens file, or made by another model or sizing."""


@dataclass(frozen=True)
class _CachedFingerprint:
    """The fingerprint with the ids of the parameter arrays it was computed from."""

    array_ids: tuple[int, ...]
    value: str


def model_fingerprint(model) -> str:
    """16 hex digits identifying a model: its config, every weight's name/shape/dtype, a few weights' values.

    Hashing all values of ViT-H (2.5 GB) would take seconds, so only ``_SAMPLED_WEIGHTS``
    weights spread over the sorted names are hashed in full. The result is cached on the
    model and recomputed when any parameter array is replaced (e.g. ``load_weights``).
    """
    params = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    ids = tuple(id(v) for _, v in params)
    cached = getattr(model, "_sam_mlx_fingerprint", None)
    if isinstance(cached, _CachedFingerprint) and cached.array_ids == ids:
        return cached.value
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, value in params:
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}\n".encode())
    picks = {round(i * (len(params) - 1) / (_SAMPLED_WEIGHTS - 1)) for i in range(_SAMPLED_WEIGHTS)}
    for i in sorted(picks):
        # float32 holds fp16/bf16 values exactly; numpy has no bfloat16.
        digest.update(np.ascontiguousarray(np.array(params[i][1].astype(mx.float32))).tobytes())
    value = digest.hexdigest()[:16]
    object.__setattr__(model, "_sam_mlx_fingerprint", _CachedFingerprint(ids, value))  # not a parameter
    return value


def model_identity(model) -> str:
    """Human-readable identity for messages: config name, weight dtypes and fingerprint."""
    dtypes = dict.fromkeys(str(v.dtype).removeprefix("mlx.core.") for _, v in tree_flatten(model.parameters()))
    return f"{model.config.name} {'+'.join(dtypes)} [{model_fingerprint(model)}]"


@dataclass(frozen=True)
class ImageTokensFile:
    """The contents of a tokens file. ``tokens`` is 1 x h x w x C with (h, w) = ``geometry.grid_size``."""

    tokens: mx.array
    geometry: ImageGeometry
    sizing: str
    size: int | tuple[int, int]
    model_fingerprint: str
    model_identity: str


def save_image_tokens(predictor, path: str | Path) -> Path:
    """Write the predictor's current image tokens and geometry to ``path`` (safetensors), atomically."""
    if not predictor.is_image_set:
        raise RuntimeError("no image set: call set_image(...) before save_image_tokens")
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
    }
    tokens = {"tokens": predictor.features}
    return atomic_write(path, lambda tmp: mx.save_safetensors(tmp, tokens, metadata=metadata), suffix=".safetensors")


def read_image_tokens(path: str | Path) -> ImageTokensFile:
    """Read a tokens file written by ``save_image_tokens``, checking its format and shapes."""
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
        raise ImageTokensError(f"{path}: image tokens format version {version!r}, expected {FORMAT_VERSION!r}")
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
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ImageTokensError(f"{path}: damaged image tokens metadata ({exc})") from None
    expected = (1, *result.geometry.grid_size)
    if result.tokens.ndim != 4 or tuple(result.tokens.shape[:3]) != expected:
        shape = tuple(result.tokens.shape)
        raise ImageTokensError(f"{path}: tokens of shape {shape} do not fit the {expected[1:]} token grid")
    return result


def load_image_tokens(predictor, path: str | Path) -> ImageTokensFile:
    """Set the predictor's image from a tokens file, as ``set_image`` would; refuse another model or sizing."""
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
    predictor.set_image_tokens(saved.tokens, saved.geometry)
    return saved
