"""The one error of checkpoint reading and conversion, and the shape checks that raise it."""

from __future__ import annotations

from collections.abc import Mapping

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
    """``state[key]``, which must exist and have exactly ``shape``."""
    expected = tuple(shape)
    found = checked_shape(state, key, len(expected), str(expected))
    if found != expected:
        raise CheckpointError(f"{key} has shape {found}, expected {expected}")
    return state[key]


def few(names: list[str]) -> str:
    """The first few of ``names`` for a message, and how many more."""
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
