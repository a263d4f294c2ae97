"""torch where the original's user has it: tensors are recognised without importing torch, and torch is imported
only to return a tensor. sam_mlx itself never needs torch."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import numpy as np


class Device(str):
    """The device the original's ``.device`` names: "cpu", where the tensors returned live (MLX computes on its
    own device, the Apple GPU when there is one). A ``str``, so torch takes it as a device without sam_mlx
    importing torch; ``.type`` and ``.index`` read as a ``torch.device``'s."""

    @property
    def type(self) -> str:
        return str(self)

    index = None

    def __eq__(self, other: object) -> bool:  # equal to torch.device("cpu") too
        return str(self) == str(other)

    __hash__ = str.__hash__


CPU = Device("cpu")
DEVICE_TYPES = ("cpu", "cuda", "mps", "gpu")


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (False without importing torch when the caller has not)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def to_numpy(value: Any) -> Any:
    """A torch tensor as a numpy array (from any device); anything else as given."""
    return value.detach().cpu().numpy() if is_tensor(value) else value


def to_tensor(array: np.ndarray, device: Any = None) -> Any:
    """A numpy array as a torch tensor (on ``device`` if given)."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor if device is None else tensor.to(device)


def tensor_device(*values: Any) -> Any:
    """The device of the first torch tensor among ``values``, or None when none is a tensor."""
    return next((value.device for value in values if is_tensor(value)), None)


def torch_installed() -> bool:
    return "torch" in sys.modules or importlib.util.find_spec("torch") is not None


def checked_device(device: Any) -> None:
    """Accept what the original's ``.to(device)`` takes ("cpu", "cuda:0", "mps", a torch.device); refuse the rest."""
    kind = str(device).split(":")[0]
    if kind not in DEVICE_TYPES:
        raise ValueError(f"device must be one of {DEVICE_TYPES} (or a torch.device of them), got {device!r}; "
                         "MLX runs on its own device whichever is named")
