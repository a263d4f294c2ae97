"""Read PyTorch ``.pth`` checkpoints into numpy without importing torch.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive: ``<root>/data.pkl`` is a
pickle whose tensors are persistent references to raw little-endian storages at
``<root>/data/<key>``. We unpickle with a whitelist (nothing but dicts, tensors
and storages is ever constructed, so a malicious file cannot run code) and view
each storage through numpy with the tensor's offset, shape and strides.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

# torch storage class name -> (numpy dtype of the raw bytes, bytes per element)
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 below
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Tensor:
    """A tensor record: its storage view is materialised after unpickling."""

    def __init__(self, storage: tuple[str, str], offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> _Tensor:
    return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(tensor, *_unused) -> _Tensor:
    return tensor


class _Unpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(f"{self.path}: unsupported object {module}.{name} in the checkpoint pickle")

    def persistent_load(self, pid: Any) -> tuple[str, str]:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent record {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        name = storage_type.name if isinstance(storage_type, _StorageType) else str(storage_type)
        if name not in _STORAGE_DTYPES:
            raise CheckpointError(f"{self.path}: unsupported tensor storage {name}")
        return name, key


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Return the flat ``{name: array}`` state dict of a zip-format ``.pth`` file.

    A top-level ``{"model": state_dict}`` or ``{"state_dict": ...}`` wrapper is unwrapped.
    bfloat16 tensors are widened to float32 (numpy has no bfloat16).
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch zip checkpoint ({exc})") from exc
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl")]
        if not pickles:
            raise CheckpointError(f"{path}: zip archive has no data.pkl; not a PyTorch checkpoint")
        root = pickles[0][: -len("data.pkl")]
        try:
            with archive.open(pickles[0]) as f:
                obj = _Unpickler(f, path).load()
            storages: dict[str, np.ndarray] = {}
            tensors = _flatten(_unwrap(obj, path), "", path)
            result = {}
            for name, t in tensors.items():
                kind, key = t.storage
                if key not in storages:
                    raw = archive.read(f"{root}data/{key}")
                    storages[key] = np.frombuffer(raw, dtype=_STORAGE_DTYPES[kind])
                result[name] = _view(storages[key], kind, t, name, path)
        except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated PyTorch checkpoint ({exc})") from exc
    return result


def _unwrap(obj: Any, path: Path) -> dict:
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict) and len(obj) <= 4:
                return obj[wrapper]
        return obj
    raise CheckpointError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")


def _flatten(obj: dict, prefix: str, path: Path) -> dict[str, _Tensor]:
    out: dict[str, _Tensor] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, _Tensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, name + ".", path))
    return out


def _view(storage: np.ndarray, kind: str, t: _Tensor, name: str, path: Path) -> np.ndarray:
    count = int(np.prod(t.size)) if t.size else 1
    last = t.offset + sum((s - 1) * st for s, st in zip(t.size, t.stride)) if count else t.offset
    if count and (t.offset < 0 or last >= storage.size):
        raise CheckpointError(f"{path}: tensor {name} of shape {t.size} runs past its storage (truncated file?)")
    item = storage.itemsize
    array = np.lib.stride_tricks.as_strided(
        storage[t.offset :], shape=t.size, strides=tuple(s * item for s in t.stride)
    ).copy()
    if kind == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array
