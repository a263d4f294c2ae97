"""Checkpoints: read Meta / Hugging Face / sam_mlx files, infer the config, convert, save.

Every format is first brought to Meta's original key names (the lingua franca of SAM
checkpoints), then mapped to sam_mlx's module names with conv kernels moved to MLX's
channels-last layout. sam_mlx's own files are plain safetensors whose metadata holds
the config (JSON) and the source they were converted from.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Callable, Mapping

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .config import PromptDecoderConfig, SamConfig, ViTConfig
from .layers import on_cpu
from .resources import format_bytes
from .torch_pickle import CheckpointError, LazyTensor, read_torch_checkpoint

FORMAT_VERSION = "1"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_FLOAT16_MAX = 65504.0

# Meta name pattern -> sam_mlx name (applied to the names of the prompt encoder and mask decoder,
# and of the ViT encoder); the TinyViT encoder has its own converter.
_RENAMES: list[tuple[str, str]] = [
    (r"^image_encoder\.patch_embed\.proj\.", "image_encoder.patch_embed."),
    (r"^image_encoder\.neck\.0\.", "image_encoder.neck.conv1."),
    (r"^image_encoder\.neck\.1\.", "image_encoder.neck.norm1."),
    (r"^image_encoder\.neck\.2\.", "image_encoder.neck.conv2."),
    (r"^image_encoder\.neck\.3\.", "image_encoder.neck.norm2."),
    (r"^prompt_encoder\.pe_layer\.", "prompt_encoder.coordinate_encoder."),
    (r"^prompt_encoder\.not_a_point_embed\.weight$", "prompt_encoder.not_a_point_embed"),
    (r"^prompt_encoder\.no_mask_embed\.weight$", "prompt_encoder.no_mask_embed"),
    (r"^prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_hint_encoder.conv1."),
    (r"^prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_hint_encoder.norm1."),
    (r"^prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_hint_encoder.conv2."),
    (r"^prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_hint_encoder.norm2."),
    (r"^prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_hint_encoder.conv3."),
    (r"^mask_decoder\.iou_token\.weight$", "mask_decoder.iou_token"),
    (r"^mask_decoder\.mask_tokens\.weight$", "mask_decoder.mask_tokens"),
    (r"^mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscaler.conv1."),
    (r"^mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscaler.norm."),
    (r"^mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscaler.conv2."),
    (r"^mask_decoder\.output_hypernetworks_mlps\.", "mask_decoder.hypernetworks."),
    (r"^mask_decoder\.iou_prediction_head\.", "mask_decoder.iou_head."),
]
_CONV = re.compile(
    r"^(image_encoder\.patch_embed|image_encoder\.neck\.conv\d|prompt_encoder\.mask_hint_encoder\.conv\d)\.weight$"
)
_CONV_TRANSPOSE = re.compile(r"^mask_decoder\.upscaler\.conv\d\.weight$")
_POINT_EMBEDDING = re.compile(r"^prompt_encoder\.point_embeddings\.(\d)\.weight$")


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
                       "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


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
            name: SafetensorsTensor(path, name, tuple(entry["shape"]), entry["dtype"], 8 + length + entry["data_offsets"][0])
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


def checked_shape(state: Mapping[str, np.ndarray], key: str, ndim: int, expected: str) -> tuple[int, ...]:
    """The shape of ``state[key]``: it must exist and have ``ndim`` non-zero dimensions, described by ``expected``."""
    if key not in state:
        raise CheckpointError(f"missing key {key!r}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim or not all(shape):
        raise CheckpointError(f"{key} has shape {shape}, expected {expected}")
    return shape


def infer_vit_config(state: Mapping[str, np.ndarray]) -> ViTConfig:
    """Infer a ViT encoder config from Meta-format ``image_encoder.*`` weights."""
    embed_dim, _, patch_size, _ = checked_shape(state, "image_encoder.patch_embed.proj.weight", 4,
                                                "embed_dim x 3 x patch x patch")
    pos = checked_shape(state, "image_encoder.pos_embed", 4, f"1 x g x g x {embed_dim}")
    if pos[3] != embed_dim:
        raise CheckpointError(f"image_encoder.pos_embed has shape {pos}, expected 1 x g x g x {embed_dim}")
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    if depth == 0:
        raise CheckpointError("no image_encoder.blocks.* keys")
    if "image_encoder.blocks.0.attn.rel_pos_h" not in state:
        raise CheckpointError("image encoder without relative position tables is not a SAM v1 encoder")
    grid = pos[1]
    global_blocks, window = [], 0
    for i in range(depth):  # a table spanning the whole grid marks a global-attention block
        rows, head_dim = checked_shape(state, f"image_encoder.blocks.{i}.attn.rel_pos_h", 2,
                                       "(2 x window - 1) x head_dim")
        size = (rows + 1) // 2
        if size == grid:
            global_blocks.append(i)
        else:
            window = size
    return ViTConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        global_attention_blocks=tuple(global_blocks),
        window_size=window,
        patch_size=patch_size,
        pretrain_grid=grid,
        mlp_dim=checked_shape(state, "image_encoder.blocks.0.mlp.lin1.weight", 2, "mlp_dim x embed_dim")[0],
        out_chans=checked_shape(state, "image_encoder.neck.0.weight", 4, "out_chans x embed_dim x 1 x 1")[0],
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        use_rel_pos=True,
    )


def infer_decoder_config(state: Mapping[str, np.ndarray]) -> PromptDecoderConfig:
    """Infer the prompt encoder / mask decoder config from Meta-format weights."""
    # The head count is not visible in the weights; every SAM v1 decoder uses 8.
    layers = {int(m.group(1)) for k in state if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    return PromptDecoderConfig(
        embed_dim=checked_shape(state, "mask_decoder.iou_token.weight", 2, "1 x embed_dim")[1],
        mask_in_chans=checked_shape(state, "prompt_encoder.mask_downscaling.3.weight", 4,
                                    "mask_in_chans x mask_in_chans/4 x 2 x 2")[0],
        num_multimask_outputs=checked_shape(state, "mask_decoder.mask_tokens.weight", 2,
                                            "(multimask outputs + 1) x embed_dim")[0] - 1,
        transformer_depth=len(layers),
        transformer_mlp_dim=checked_shape(state, "mask_decoder.transformer.layers.0.mlp.lin1.weight", 2,
                                          "mlp_dim x embed_dim")[0],
        iou_head_depth=len({k for k in state if re.match(r"mask_decoder\.iou_prediction_head\.layers\.\d+\.weight$", k)}),
        iou_head_hidden_dim=checked_shape(state, "mask_decoder.iou_prediction_head.layers.0.weight", 2,
                                          "hidden_dim x embed_dim")[0],
    )


def convert_meta(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], SamConfig]:
    """Meta-format state dict (SAM ViT or MobileSAM) -> (sam_mlx weights, config).

    The config is inferred from names and shapes alone and the model's size checked before any weight is
    read (lazy tensors stay lazy through renaming and transposing).
    """
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    tiny_vit = "image_encoder.patch_embed.proj.weight" not in state
    if not tiny_vit:
        encoder = infer_vit_config(state)
    elif any(k.startswith("image_encoder.layers.") for k in state):
        from .tiny_vit import infer_tiny_vit_config

        encoder = infer_tiny_vit_config(state, prefix="image_encoder.")
    else:
        raise CheckpointError("no image encoder weights (image_encoder.patch_embed.proj.weight or image_encoder.layers.*)")
    config = SamConfig(encoder=encoder, decoder=infer_decoder_config(state), image_size=_image_size(encoder))
    check_model_fits(config)
    weights: dict[str, np.ndarray] = {}
    rest = state
    if tiny_vit:
        from .tiny_vit import convert_tiny_vit_weights

        weights.update({f"image_encoder.{k}": v for k, v in convert_tiny_vit_weights(state, "image_encoder.").items()})
        rest = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}

    points: dict[int, np.ndarray] = {}
    for key, value in rest.items():
        if m := _POINT_EMBEDDING.match(key):
            if tuple(value.shape) != (1, config.decoder.embed_dim):
                raise CheckpointError(f"{key} has shape {tuple(value.shape)}, expected (1, {config.decoder.embed_dim})")
            require_float(value, key)
            points[int(m.group(1))] = value
            continue
        name = key
        for pattern, replacement in _RENAMES:
            name, n = re.subn(pattern, replacement, name)
            if n:
                break
        if _CONV.match(name):
            value = value.transpose(0, 2, 3, 1)
        elif _CONV_TRANSPOSE.match(name):
            value = value.transpose(1, 2, 3, 0)
        weights[name] = value
    if sorted(points) != [0, 1, 2, 3]:
        raise CheckpointError(f"expected prompt_encoder.point_embeddings.0..3, found indices {sorted(points)}")
    weights["prompt_encoder.point_embeddings"] = np.concatenate([np.asarray(points[i]) for i in range(4)], axis=0)
    return weights, config


def check_model_fits(config: SamConfig, model=None) -> None:
    """Refuse a config whose float32 weights alone would exceed this machine's memory: a crafted or damaged
    file can describe a model of any size, and nothing of it is read before this check."""
    from .resources import machine_memory
    from .sam import Sam

    model = Sam(config) if model is None else model  # parameters not evaluated: no memory yet
    count = sum(v.size for _, v in tree_flatten(model.parameters()))
    available = machine_memory()
    if available is not None and 4 * count > available:
        raise CheckpointError(f"the weights describe a {config.name} model of {count / 1e6:.0f} M parameters "
                              f"({format_bytes(4 * count)} as float32), more than this machine's memory "
                              f"({format_bytes(available)})")


def _image_size(encoder) -> int:
    return encoder.pretrain_grid * encoder.patch_size if encoder.kind == "vit" else 1024


def convert_state_dict(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], SamConfig]:
    """Any supported foreign state dict -> (sam_mlx weights, config)."""
    if detect_format(state) == "hf":
        from .hf_format import hf_to_meta

        state = hf_to_meta(state)
    return convert_meta(state)


def check_weights(model, weights: Mapping[str, object], source: str) -> None:
    """Raise CheckpointError naming any missing, unexpected, mis-shaped or non-float parameter (nothing is read)."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing weights {_few(missing)}")
    if extra:
        raise CheckpointError(f"{source}: unexpected weights {_few(extra)}")
    for key, shape in expected.items():
        got = tuple(weights[key].shape)
        if got != shape:
            raise CheckpointError(f"{source}: weight {key} has shape {got}, expected {shape}")
        require_float(weights[key], key, f"{source}: ")


def require_float(value: object, key: str, prefix: str = "") -> None:
    """Raise CheckpointError unless ``value`` (an mlx or numpy array or a LazyTensor, unread) holds floats:
    integer or boolean bytes read as weights would give plausible-looking garbage."""
    dtype = value.dtype
    if not (mx.issubdtype(dtype, mx.floating) if isinstance(dtype, mx.Dtype) else np.issubdtype(dtype, np.floating)):
        stored, name = getattr(value, "stored_type", dtype), getattr(value, "name", key)  # the file's own name
        raise CheckpointError(f"{prefix}weight {name} holds {stored} values; SAM weights are floating point")


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def default_encoder_dtype(config: SamConfig) -> mx.Dtype:
    """The image encoder's precision when none is asked for: float32 on the CPU; on a GPU (Apple
    Silicon) half precision, which halves the encoder's memory traffic there.

    On a GPU, TinyViT (MobileSAM) gets float16 and the ViT bfloat16. float16 keeps 3 more bits: on
    sam_mlx's GPU branches with MobileSAM's real weights (``scripts/precision.py``), its image tokens
    are ~10x closer to float32's than bfloat16's, and TinyViT's largest activation (~900, on noise)
    is far below float16's 65504. Meta's ViT-H is reported to overflow float16 (segment-anything
    issue #540), so the ViT keeps bfloat16, which has float32's range. On MLX's CPU backend
    half-precision matmuls and transcendental functions are slower than float32.
    """
    if on_cpu():
        return mx.float32
    return mx.bfloat16 if config.encoder.kind == "vit" else mx.float16


def build_model(weights: Mapping[str, object], config: SamConfig, source: str, dtype: mx.Dtype | None = None):
    """Instantiate Sam from converted weights, checking every name and shape first.

    ``dtype`` casts every weight; by default the image encoder gets ``default_encoder_dtype(config)``
    and the small prompt encoder and mask decoder stay in float32.
    """
    from .sam import Sam

    try:
        model = Sam(config)
    except ValueError as exc:
        raise CheckpointError(f"{source}: weights imply an impossible model ({exc})") from exc
    try:
        check_model_fits(config, model)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    check_weights(model, weights, source)
    arrays, non_finite = [], []
    for key, value in weights.items():  # read one at a time; numpy's finiteness test is ~10x faster than MLX's CPU one
        if isinstance(value, mx.array):
            finite = mx.isfinite(value).all().item()
        else:
            value = np.asarray(value)
            finite = bool(np.isfinite(value).all())
            value = mx.array(value)
        arrays.append((key, value))
        if not finite:
            non_finite.append(key)
    if non_finite:
        raise CheckpointError(f"{source}: weights with NaN or infinite values: {_few(sorted(non_finite))}")
    if dtype is not None:
        arrays = [(k, v.astype(dtype)) for k, v in arrays]
    else:
        encoder_dtype = default_encoder_dtype(config)
        arrays = [
            (k, v.astype(encoder_dtype if k.startswith("image_encoder.") else mx.float32)) for k, v in arrays
        ]
    model.load_weights(arrays)
    model.eval()
    mx.eval(model.parameters())
    return model


def load_checkpoint(path: str | Path, dtype: mx.Dtype | None = None):
    """Load a SAM model from a Meta .pth, a transformers safetensors or a sam_mlx safetensors file."""
    path = Path(path)
    state, metadata = read_state_dict(path)
    if "sam_mlx_config" in metadata:
        return build_model(state, _sam_mlx_config(metadata, path), str(path), dtype)
    try:
        weights, config = convert_state_dict(state)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (ValueError, KeyError) as exc:  # e.g. a config the model refuses (TinyViTConfig's stage count)
        raise CheckpointError(f"{path}: invalid weights ({exc})") from exc
    return build_model(weights, config, str(path), dtype)


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


def save_model(model, path: str | Path, dtype: str = "float32", source: str = "") -> Path:
    """Write the model's weights as safetensors (config and source in the metadata), atomically."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    params = tree_flatten(model.parameters())
    if dtype == "float16":  # float16's largest finite value is 65504: larger weights would become inf
        too_large = [k for k, v in params if mx.abs(v).max().item() > _FLOAT16_MAX]
        if too_large:
            raise ValueError(f"weights {_few(too_large)} exceed float16's largest value ({_FLOAT16_MAX:g}) and would "
                             "become infinite: save as bfloat16 or float32")
    weights = {k: v.astype(DTYPES[dtype]) for k, v in params}
    metadata = {
        "format": "sam_mlx",
        "format_version": FORMAT_VERSION,
        "sam_mlx_config": json.dumps(model.config.to_dict()),
        "source": source,
        "dtype": dtype,
    }
    return atomic_write(path, lambda tmp: mx.save_safetensors(tmp, weights, metadata=metadata), suffix=".safetensors")


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` then rename into place, so readers never see a partial file.

    Inside ``one_set_of_files`` the rename waits for the end of the set. A failed write (MLX raises
    RuntimeError, e.g. on a full disk) is an OSError naming the file and the space left in its folder.
    The temporary (hidden: ``.<name>.<random>.tmp<suffix>``) is locked while written, so
    ``remove_abandoned_temporaries`` deletes those of killed writers but never a live one.
    """
    path = Path(path)
    pending = _pending_set.get()
    if pending is None:
        with _locked_temporary(path, suffix) as tmp:
            _write(path, tmp, write)
            os.replace(tmp, path)
        return path
    stack, renames = pending
    tmp = stack.enter_context(_locked_temporary(path, suffix))
    _write(path, tmp, write)
    renames.append((tmp, path))
    return path


# (the open temporaries, their renames) of the innermost ``one_set_of_files`` block
_pending_set: contextvars.ContextVar[tuple[contextlib.ExitStack, list] | None] = contextvars.ContextVar(
    "sam_mlx_pending_set", default=None)


@contextlib.contextmanager
def one_set_of_files() -> Iterator[None]:
    """Make the files ``atomic_write`` writes in this block (in this thread) one set: each goes to its temporary,
    and only when the block ends without an error are all renamed into place; if it fails, no file is
    replaced and no temporary is left."""
    with contextlib.ExitStack() as stack:
        renames: list[tuple[str, Path]] = []
        token = _pending_set.set((stack, renames))
        try:
            yield
        finally:
            _pending_set.reset(token)
        for tmp, path in renames:
            os.replace(tmp, path)


def _write(path: Path, tmp: str, write: Callable[[str], None]) -> None:
    try:
        write(tmp)
    except (OSError, RuntimeError) as exc:
        free = format_bytes(shutil.disk_usage(path.parent).free)
        raise OSError(f"could not write {path}: {exc} ({free} free in {path.parent})") from exc
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions


@contextlib.contextmanager
def _locked_temporary(path: Path, suffix: str) -> Iterator[str]:
    """A new hidden temporary beside ``path``, locked (where locks exist) until the block ends; removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        if not _lock(fd, blocking=True):  # no locks here (e.g. Windows): write it unlocked and closed
            os.close(fd)
            fd = None
            break
        if _still_named(fd, tmp):
            break
        os.close(fd)  # removed as abandoned between its creation and its locking: make another
    try:
        yield tmp
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def locked_folder(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (where the system has such locks) while the block runs: processes
    writing sets of files into one folder take turns."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder: no lock
        yield
        return
    try:
        _lock(fd, blocking=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_abandoned_temporaries(folder: Path, names: str | None = None) -> None:
    """Delete ``atomic_write`` temporaries in ``folder`` that nobody is writing (their writer was killed): all of
    them, or only those of files whose names match the regular expression ``names`` (the folder may be the user's)."""
    ours = re.compile(rf"\.({names or '.+'})\.[a-z0-9_]{{8}}\.tmp.*")
    for tmp in folder.iterdir():
        if not ours.fullmatch(tmp.name):
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _lock(fd, blocking=False):
                tmp.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _lock(fd: int, blocking: bool) -> bool:
    """Exclusive flock on ``fd``; False if held elsewhere (non-blocking) or locks are unavailable."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except (ImportError, OSError):  # Windows, file systems without locks, or held by a live writer
        return False


def _still_named(fd: int, tmp: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(tmp))
    except FileNotFoundError:
        return False
