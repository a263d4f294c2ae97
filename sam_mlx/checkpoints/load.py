"""Checkpoints: read Meta / Hugging Face / sam_mlx files, convert, build the model, save.

Every foreign format is first brought to Meta's original key names (the lingua franca of SAM
checkpoints, ``hf``), then to sam_mlx's parameters (``meta``). sam_mlx's own files are plain
safetensors of those parameters, whose metadata holds the config (JSON), the format version and
the source they were converted from.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..config import SamConfig
from ..io.atomic import atomic_write
from ..modeling.sam import Sam
from ..ops import backend
from .errors import CheckpointError, few, require_float
from .meta import check_model_fits, convert_meta
from .quantize import quantized_layout
from .torch_pickle import LazyTensor, read_torch_checkpoint

# 2: parameters named after the model's components (image encoder stages, coordinate encoder, mask hint
# encoder in the mask decoder, mask generator, IoU MLP); version 1's files are refused, not renamed.
FORMAT_VERSION = "2"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_FLOAT16_MAX = 65504.0


def read_state_dict(path: str | Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Read any supported checkpoint file's header into ``({name: LazyTensor}, safetensors metadata)``.

    No tensor data is read: ``np.asarray`` reads a tensor once its name, shape and dtype were checked.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        return read_torch_checkpoint(path), {}
    if len(head) == 8 and 0 < int.from_bytes(head, "little") < 100_000_000:
        return _read_safetensors(path)
    raise CheckpointError(f"{path}: not a PyTorch (.pth) or safetensors checkpoint")


# safetensors dtype -> numpy dtype of its bytes (BF16 reads as float32); others are refused when read
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                       "I16": "<i2", "I8": "i1", "U32": "<u4", "U8": "u1", "BOOL": "?"}


class SafetensorsTensor(LazyTensor):
    """A tensor of a safetensors file: ``nbytes`` bytes at byte ``start`` of the file."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], stored_type: str, start: int):
        raw = np.dtype(_SAFETENSORS_DTYPES.get(stored_type, "V1"))
        super().__init__(str(path), name, shape, np.dtype(np.float32) if stored_type == "BF16" else raw, stored_type)
        self.path, self.raw_dtype, self.start = path, raw, start

    def load(self) -> np.ndarray:
        count = int(np.prod(self.stored_shape))
        with open(self.path, "rb") as f:
            f.seek(self.start)
            raw = f.read(count * self.raw_dtype.itemsize)
        if len(raw) != count * self.raw_dtype.itemsize:
            raise CheckpointError(f"{self.path}: weight {self.name} runs past the end of the file (truncated?)")
        array = np.frombuffer(raw, self.raw_dtype).reshape(self.stored_shape)
        return (array.astype(np.uint32) << 16).view(np.float32) if self.stored_type == "BF16" else array.copy()


def _read_safetensors(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """The header of a safetensors file (checked by the safetensors library: every tensor's bytes lie in the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        return {
            name: SafetensorsTensor(path, name, tuple(entry["shape"]), entry["dtype"],
                                    8 + length + entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"
        }, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def detect_format(state: Mapping[str, object]) -> str:
    """'meta' (Meta's / MobileSAM's names), 'hf' (transformers SamModel) or raise."""
    keys = set(state)
    if "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in keys:
        return "meta"
    if "shared_image_embedding.positional_embedding" in keys:
        return "hf"
    if any(k.startswith(("sam_mask_decoder.", "memory_attention.", "memory_encoder.")) for k in keys):
        raise CheckpointError("this is a SAM 2 checkpoint (sam_mask_decoder/memory_* keys); sam_mlx supports SAM v1")
    raise CheckpointError(
        "not a SAM v1 checkpoint: no prompt_encoder.pe_layer.positional_encoding_gaussian_matrix "
        "(Meta format) or shared_image_embedding.positional_embedding (Hugging Face format) key"
    )


def convert_state_dict(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], SamConfig]:
    """Any supported foreign state dict -> (sam_mlx weights, config)."""
    if detect_format(state) == "hf":
        from .hf import hf_to_meta

        state = hf_to_meta(state)
    return convert_meta(state)


def check_weights(model: Sam, weights: Mapping[str, object], source: str) -> None:
    """Raise CheckpointError naming any missing, unexpected, mis-shaped or non-float parameter (nothing is read)."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing weights {few(missing)}")
    if extra:
        raise CheckpointError(f"{source}: unexpected weights {few(extra)}")
    packed = {k for k, v in tree_flatten(model.parameters()) if v.dtype == mx.uint32}  # quantized weights
    for key, shape in expected.items():
        got = tuple(weights[key].shape)
        if got != shape:
            raise CheckpointError(f"{source}: weight {key} has shape {got}, expected {shape}")
        if key not in packed:
            require_float(weights[key], key, f"{source}: ")
        elif str(weights[key].dtype).removeprefix("mlx.core.") != "uint32":  # numpy's or MLX's name
            raise CheckpointError(f"{source}: quantized weight {key} holds {weights[key].dtype} values, "
                                  "expected uint32")


def default_encoder_dtype(config: SamConfig) -> mx.Dtype:
    """The image encoder's precision when none is asked for: float32 on the CPU; on a GPU, by chip.

    - TinyViT (MobileSAM): float16 on every GPU. Its activations stay below 1/16 of float16's range
      (``tests/test_gpu_branches.py``), and float16 keeps 3 more bits than bfloat16: ~10x closer to float32.
    - ViT: bfloat16 where the GPU computes it natively (Apple M3 and later, other GPUs); float32 on Apple M1
      and M2 (MLX's ``device_info()["architecture"]`` applegpu_g13*/g14*), which emulate bfloat16 (reported
      20-40% slower than float16 there) and run float32 arithmetic at float16's rate. Meta's ViT-H is reported
      to overflow float16 (segment-anything issue #540), so the ViT never gets float16 by default.
    ``--dtype`` / ``load(dtype=...)`` choose otherwise; ``scripts/device_check.py`` times each on a chip.
    On MLX's CPU backend half-precision matmuls and transcendental functions are slower than float32.
    """
    if backend.on_cpu():
        return mx.float32
    if config.encoder.kind != "vit":
        return mx.float16
    return mx.bfloat16 if native_bfloat16() else mx.float32


def native_bfloat16() -> bool:
    """Whether the GPU computes bfloat16 natively, from the architecture MLX reports: Apple GPUs from the
    M3 (applegpu_g15) on; True for any other GPU (CUDA GPUs MLX supports have bfloat16)."""
    architecture = str(mx.device_info().get("architecture", ""))
    match = re.fullmatch(r"applegpu_g(\d+)\w*", architecture)
    return match is None or int(match.group(1)) >= 15


def build_model(weights: Mapping[str, object], config: SamConfig, source: str, dtype: mx.Dtype | None = None,
                quantize: int | None = None) -> Sam:
    """Instantiate Sam from converted weights, checking every name and shape first.

    ``dtype`` casts every weight; by default the image encoder gets ``default_encoder_dtype(config)``
    and the small prompt encoder and mask decoder stay in float32. ``quantize`` (8 or 4) quantizes the
    image encoder's Linear weights as they are read (``checkpoints.quantize``); a quantized file's config says so.
    """
    if quantize is not None and config.encoder_bits not in (None, quantize):
        raise CheckpointError(f"{source}: the image encoder is already quantized to {config.encoder_bits} bits; "
                              f"it cannot be quantized to {quantize}")
    try:
        model = Sam(config)
    except ValueError as exc:
        raise CheckpointError(f"{source}: weights imply an impossible model ({exc})") from exc
    if config.encoder_bits is not None:
        quantized_layout(model.image_encoder, config.encoder_bits)
    try:
        check_model_fits(config, model)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    check_weights(model, weights, source)
    to_quantize: dict[str, nn.QuantizedLinear] = {}  # float weights quantized as they are read
    if quantize is not None and config.encoder_bits is None:
        quantized_layout(model.image_encoder, quantize)
        to_quantize = {f"image_encoder.{path}.weight": layer for path, layer in model.image_encoder.named_modules()
                       if isinstance(layer, nn.QuantizedLinear)}
        model.config = dataclasses.replace(config, encoder_bits=quantize)
    encoder_dtype = default_encoder_dtype(config) if dtype is None else dtype
    other_dtype = mx.float32 if dtype is None else dtype
    arrays, non_finite = [], []
    # read, checked, cast (and quantized) one tensor at a time, each evaluated before the next is read: the peak is
    # the model as loaded plus one float32 tensor, not every weight in float32 (ViT-H: 2.5 GB) before the cast
    for key, value in weights.items():  # numpy's finiteness test is faster than MLX's CPU one
        if isinstance(value, mx.array):
            finite = mx.isfinite(value).all().item()
        else:
            value = np.asarray(value)
            finite = bool(np.isfinite(value).all())
            value = mx.array(value)
        if not finite:
            non_finite.append(getattr(weights[key], "name", key))  # the file's own name
        if mx.issubdtype(value.dtype, mx.floating):  # not a quantized weight's packed integers
            value = value.astype(encoder_dtype if key.startswith("image_encoder.") else other_dtype)
        layer = to_quantize.get(key)
        if layer is None:
            mx.eval(value)
            arrays.append((key, value))
        else:
            packed = mx.quantize(value, group_size=layer.group_size, bits=layer.bits)
            mx.eval(packed)
            arrays += zip((key, key.removesuffix("weight") + "scales", key.removesuffix("weight") + "biases"), packed)
    if non_finite:
        raise CheckpointError(f"{source}: weights with NaN or infinite values: {few(sorted(non_finite))}")
    model.load_weights(arrays)
    model.eval()
    mx.eval(model.parameters())
    return model


def load_checkpoint(path: str | Path, dtype: mx.Dtype | None = None, quantize: int | None = None) -> Sam:
    """Load a SAM model from a Meta .pth, a transformers safetensors or a sam_mlx safetensors file; ``quantize``
    (8 or 4): with the image encoder's Linear weights quantized to that many bits."""
    path = Path(path)
    if quantize not in (None, 8, 4):
        raise ValueError(f"quantize must be 8 or 4 bits, got {quantize!r}")
    state, metadata = read_state_dict(path)
    if "sam_mlx_config" in metadata:
        return build_model(state, _sam_mlx_config(metadata, path), str(path), dtype, quantize)
    try:
        weights, config = convert_state_dict(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (ValueError, KeyError) as exc:  # e.g. a config the model refuses (TinyViTConfig's stage count)
        raise CheckpointError(f"{path}: invalid weights ({exc})") from exc
    return build_model(weights, config, str(path), dtype, quantize)


def _sam_mlx_config(metadata: Mapping[str, str], path: Path) -> SamConfig:
    """The config in a sam_mlx file's metadata, after checking the file's format version."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: sam_mlx model format version {version!r}, expected {FORMAT_VERSION!r} "
            "(convert the original checkpoint again with this sam_mlx)"
        )
    try:
        return SamConfig.from_dict(json.loads(metadata["sam_mlx_config"]))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON or fields of the wrong kind
        raise CheckpointError(f"{path}: invalid sam_mlx metadata ({exc})") from exc


def save_model(model: Sam, path: str | Path, dtype: str = "float32", source: str = "") -> Path:
    """Write the model's weights as safetensors (config and source in the metadata), atomically."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    params = tree_flatten(model.parameters())
    floats = [(k, v) for k, v in params if mx.issubdtype(v.dtype, mx.floating)]  # not quantized weights' integers
    if dtype == "float16":  # float16's largest finite value is 65504: larger weights would become inf
        too_large = [k for k, v in floats if mx.abs(v).max().item() > _FLOAT16_MAX]
        if too_large:
            raise ValueError(f"weights {few(too_large)} exceed float16's largest value ({_FLOAT16_MAX:g}) and would "
                             "become infinite: save as bfloat16 or float32")
    weights = {k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in params}
    metadata = {
        "format": "sam_mlx",
        "format_version": FORMAT_VERSION,
        "sam_mlx_config": json.dumps(model.config.to_dict()),
        "source": source,
        "dtype": dtype,
    }
    return atomic_write(path, lambda tmp: mx.save_safetensors(tmp, weights, metadata=metadata), suffix=".safetensors")
