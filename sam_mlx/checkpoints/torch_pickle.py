"""Read PyTorch ``.pth`` checkpoints into numpy without importing torch, safely.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive: ``<root>/data.pkl`` is a pickle whose tensors are
persistent references to raw little-endian storages at ``<root>/data/<key>``. The file may be hostile:

- the pickle is read by a whitelisting unpickler: nothing but dicts, tensor records and storage types is
  ever constructed, and BUILD (setting an object's state) is accepted only on the state dict's OrderedDicts,
  whose state (torch's ``_metadata``) is dropped: a crafted file can neither run code nor alter sam_mlx;
- every tensor record is checked against the zip directory before any storage is read: its offset, shape
  and strides (of any sign) must address elements inside its storage, each once (a broadcast view would
  materialise more than the file holds); each storage's byte length must be its declared element count
  times its type's item size; and storages may hold at most twice the bytes their tensors use;
- a tensor's bytes are read only when it is used (``StoredTensor``): after the caller has checked its name,
  shape and dtype against the model, and then only the span its strides address;
- any other fault (not a zip, a bad pickle, deep nesting, encrypted or unsupported zip entries, ...)
  is one ``CheckpointError`` naming the file.
"""

from __future__ import annotations

import collections
import copy
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

# torch storage class name -> numpy dtype of its raw bytes
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 when read
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_MAX_PICKLE_BYTES = 64 << 20  # a SAM state dict's pickle is ~100 KB (ViT-H); only the tensors' data is large
_MAX_DIMS = 8
_STORAGE_SLACK_BYTES = 1 << 20


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    def __init__(self, kind: str, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class _TensorRecord:
    """``_rebuild_tensor_v2``'s arguments, checked once unpickling is done."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> _TensorRecord:
    return _TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(tensor, *_unused) -> Any:
    return tensor


class _Unpickler(pickle._Unpickler):
    """The pure-Python unpickler, whose opcode table can be changed: find_class, persistent ids and BUILD
    accept only what a state dict needs."""

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

    def persistent_load(self, pid: Any) -> _Storage:
        # ("storage", storage type, key, location, element count)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent record in the checkpoint pickle")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self.path}: unsupported tensor storage type in the checkpoint pickle")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise CheckpointError(f"{self.path}: malformed storage record {key!r} in the checkpoint pickle")
        return _Storage(storage_type.name, key, numel)

    def load_build(self) -> None:
        state = self.stack.pop()
        if type(self.stack[-1]) is not collections.OrderedDict or not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: the checkpoint pickle sets the state of an object it may not")
        # torch keeps the modules' versions (``_metadata``) this way; sam_mlx does not need them

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: load_build}


class LazyTensor:
    """A tensor of a checkpoint file, read only when converted to an array (``np.asarray``).

    ``shape`` and ``dtype`` (the dtype it reads as; ``stored_type`` names the file's) are known without
    reading, so names, shapes and dtypes can be checked against the model first (``checkpoints.load.check_weights``,
    ``checkpoints.errors.require_float``); ``transpose`` is lazy too.
    """

    def __init__(self, source: str, name: str, shape: tuple[int, ...], dtype: np.dtype, stored_type: str):
        self.source, self.name, self.stored_shape, self.dtype = source, name, shape, dtype
        self.stored_type = stored_type
        self.shape, self.axes = shape, None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def transpose(self, *axes: int) -> LazyTensor:
        base = tuple(range(len(self.stored_shape))) if self.axes is None else self.axes
        view = copy.copy(self)
        view.axes, view.shape = tuple(base[a] for a in axes), tuple(self.shape[a] for a in axes)
        return view

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.load()
        array = array if self.axes is None else array.transpose(self.axes)
        return array if dtype is None else array.astype(dtype)

    def load(self) -> np.ndarray:
        """The values, in the stored layout."""
        raise NotImplementedError


class StoredTensor(LazyTensor):
    """A tensor of a ``.pth`` file: an offset, shape and strides into one of its storages."""

    def __init__(self, archive: _Archive, name: str, storage: _Storage, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        dtype = np.dtype(np.float32) if storage.kind == "BFloat16Storage" else _STORAGE_DTYPES[storage.kind]
        super().__init__(str(archive.path), name, shape, dtype, storage.kind)
        self.archive, self.storage, self.offset, self.stride = archive, storage, offset, stride

    def span(self) -> tuple[int, int]:
        """The lowest and highest storage element this tensor addresses (offset, shape and strides of any sign)."""
        low = high = self.offset
        for size, stride in zip(self.stored_shape, self.stride, strict=True):
            reach = (size - 1) * stride
            low, high = low + min(reach, 0), high + max(reach, 0)
        return low, high

    def load(self) -> np.ndarray:
        if math.prod(self.stored_shape) == 0:
            return np.zeros(self.stored_shape, self.dtype)
        low, high = self.span()
        raw_dtype = _STORAGE_DTYPES[self.storage.kind]
        elements = np.frombuffer(self.archive.read(self, low, high), dtype=raw_dtype)
        strides = tuple(s * raw_dtype.itemsize for s in self.stride)
        array = np.lib.stride_tricks.as_strided(elements[self.offset - low :], self.stored_shape, strides).copy()
        if self.storage.kind == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


class _Archive:
    """The open zip file the ``StoredTensor``s of one checkpoint read from."""

    def __init__(self, path: Path, zip_file: zipfile.ZipFile, root: str):
        self.path, self.zip, self.root = path, zip_file, root

    def entry(self, key: str) -> zipfile.ZipInfo:
        try:
            return self.zip.getinfo(f"{self.root}data/{key}")
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {key!r} is missing from the archive (truncated?)") from None

    def read(self, tensor: StoredTensor, low: int, high: int) -> bytes:
        """The bytes of elements ``low..high`` of ``tensor``'s storage."""
        item = _STORAGE_DTYPES[tensor.storage.kind].itemsize
        try:
            with self.zip.open(self.entry(tensor.storage.key)) as f:
                f.seek(low * item)
                raw = f.read((high - low + 1) * item)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001  (zip, decompression and I/O faults alike)
            raise CheckpointError(f"{self.path}: corrupt or truncated PyTorch checkpoint, tensor {tensor.name} "
                                  f"({type(exc).__name__}: {exc})") from None
        if len(raw) != (high - low + 1) * item:
            raise CheckpointError(f"{self.path}: tensor {tensor.name} runs past the end of its storage (truncated?)")
        return raw


def read_torch_checkpoint(path: str | Path) -> dict[str, StoredTensor]:
    """Return the flat ``{name: StoredTensor}`` state dict of a zip-format ``.pth`` file, nothing read yet.

    A top-level ``{"model": state_dict}`` or ``{"state_dict": ...}`` wrapper is unwrapped. ``np.asarray``
    reads a tensor (bfloat16 widened to float32: numpy has no bfloat16).
    """
    path = Path(path)
    try:
        return _read(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001  (every fault of a hostile zip or pickle: one error naming the file)
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise CheckpointError(f"{path}: corrupt or unsupported PyTorch checkpoint ({detail})") from None


def _read(path: Path) -> dict[str, StoredTensor]:
    try:
        zip_file = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch zip checkpoint ({exc})") from None
    pickles = [info for info in zip_file.infolist() if info.filename.endswith("data.pkl")]
    if not pickles:
        raise CheckpointError(f"{path}: zip archive has no data.pkl; not a PyTorch checkpoint")
    if pickles[0].file_size > _MAX_PICKLE_BYTES:
        raise CheckpointError(f"{path}: its data.pkl declares {pickles[0].file_size} bytes; a state dict's is smaller")
    for info in zip_file.infolist():
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{path}: archive entry {info.filename} is encrypted")
    archive = _Archive(path, zip_file, pickles[0].filename[: -len("data.pkl")])
    with zip_file.open(pickles[0]) as f:
        obj = _Unpickler(f, path).load()
    records = _flatten(_unwrap(obj, path), "", path)
    tensors = {name: _checked_tensor(archive, name, record) for name, record in records.items()}
    _check_storages(archive, tensors)
    return tensors


def _unwrap(obj: Any, path: Path) -> dict:
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], dict) and len(obj) <= 4:
                return obj[wrapper]
        return obj
    raise CheckpointError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")


def _flatten(obj: dict, prefix: str, path: Path) -> dict[str, _TensorRecord]:
    out: dict[str, _TensorRecord] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, _TensorRecord):
            out[name] = value
        elif isinstance(value, dict):
            out.update(_flatten(value, name + ".", path))
    return out


def _is_ints(values: Any) -> bool:
    return isinstance(values, tuple) and all(type(v) is int for v in values)


def _checked_tensor(archive: _Archive, name: str, record: _TensorRecord) -> StoredTensor:
    """A record whose offset, shape and strides address elements inside its storage, each once."""
    path, storage = archive.path, record.storage
    if not isinstance(storage, _Storage) or type(record.offset) is not int or not _is_ints(record.size) \
            or not _is_ints(record.stride) or len(record.size) != len(record.stride):
        raise CheckpointError(f"{path}: malformed tensor record {name}")
    if len(record.size) > _MAX_DIMS or any(s < 0 for s in record.size):
        raise CheckpointError(f"{path}: tensor {name} has an impossible shape {record.size}")
    tensor = StoredTensor(archive, name, storage, record.offset, record.size, record.stride)
    count = math.prod(record.size)
    if count == 0:
        return tensor
    low, high = tensor.span()
    if low < 0 or high >= storage.numel:
        raise CheckpointError(f"{path}: tensor {name} of shape {record.size} and strides {record.stride} at offset "
                              f"{record.offset} addresses elements {low}..{high} outside its storage of "
                              f"{storage.numel} (truncated or tampered file)")
    if high - low + 1 != count:  # a broadcast (stride 0) or gapped view: its elements are not all in the file
        raise CheckpointError(f"{path}: tensor {name} of shape {record.size} with strides {record.stride} does not "
                              f"cover its {high - low + 1} storage elements once each; save the tensors contiguous")
    return tensor


def _check_storages(archive: _Archive, tensors: dict[str, StoredTensor]) -> None:
    """Each storage's bytes match its declared type and count, and its tensors use at least half of them."""
    used: dict[str, int] = {}
    storages: dict[str, _Storage] = {}
    for tensor in tensors.values():
        storage = tensor.storage
        if math.prod(tensor.stored_shape) == 0:
            continue
        if storages.setdefault(storage.key, storage).kind != storage.kind:
            raise CheckpointError(f"{archive.path}: storage {storage.key!r} is declared with two types")
        low, high = tensor.span()
        used[storage.key] = used.get(storage.key, 0) + high - low + 1
    for key, storage in storages.items():
        item = _STORAGE_DTYPES[storage.kind].itemsize
        entry = archive.entry(key)
        if entry.file_size != storage.numel * item:
            raise CheckpointError(
                f"{archive.path}: storage {key!r} holds {entry.file_size} bytes, but is declared as {storage.numel} "
                f"{storage.kind} elements ({storage.numel * item} bytes): wrong type or truncated"
            )
        if storage.numel * item > 2 * used[key] * item + _STORAGE_SLACK_BYTES:
            raise CheckpointError(f"{archive.path}: storage {key!r} declares {storage.numel * item} bytes, far more "
                                  f"than its tensors use ({used[key] * item})")
