"""The one error of checkpoint reading and conversion, and the shape checks that raise it."""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import numpy as np


class CheckpointError(ValueError):
    """A file that is not a readable SAM checkpoint; the message names the file and the fault."""


def checked_shape(state: Mapping[str, np.ndarray], key: str, ndim: int, expected: str) -> tuple[int, ...]:
    """The shape of ``state[key]``: it must exist and have ``ndim`` non-zero dimensions, described by ``expected``."""
    if key not in state:
        raise CheckpointError(f"missing key {key!r}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim or not all(shape):
        raise CheckpointError(f"{key} has shape {shape}, expected {expected}")
    return shape


def checked(state: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``state[key]``, which must exist, have exactly ``shape`` and hold floats (not read: a ``LazyTensor`` stays
    lazy)."""
    expected = tuple(shape)
    found = checked_shape(state, key, len(expected), str(expected))
    if found != expected:
        raise CheckpointError(f"{key} has shape {found}, expected {expected}")
    require_float(state[key], key)
    return state[key]


def require_float(value: object, key: str, prefix: str = "") -> None:
    """Raise CheckpointError unless ``value`` (an mlx or numpy array or a ``LazyTensor``, unread) holds floats:
    integer or boolean bytes read as weights would give plausible-looking garbage."""
    dtype = value.dtype
    if not (mx.issubdtype(dtype, mx.floating) if isinstance(dtype, mx.Dtype) else np.issubdtype(dtype, np.floating)):
        stored, name = getattr(value, "stored_type", dtype), getattr(value, "name", key)  # the file's own name
        raise CheckpointError(f"{prefix}weight {name} holds {stored} values; SAM weights are floating point")


def few(names: list[str]) -> str:
    """The first few of ``names`` for a message, and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
