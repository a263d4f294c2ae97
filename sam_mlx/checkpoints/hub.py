"""Resolve a model name, Hugging Face Hub repo id or local path to a sam_mlx checkpoint file.

Everything that is not already a sam_mlx safetensors file is converted once and the
result cached, so later loads read a ready file with no conversion and no network:

  <cache>/hub/<owner>--<name>[--<file>]/<code>.safetensors   converted from a Hub download
  <cache>/local/<stem>-<path hash>/<key>.safetensors         converted from a local file; the
                                                             key hashes its size, mtime and <code>
  <cache>/downloads/<owner>--<name>/                         where to drop a manually downloaded
                                                             Hub file on an offline machine

``<code>`` hashes sam_mlx's own source (every module of every sub-package), so a conversion
made by other code (another release, or a converter being edited) is never reused, and a
cached file of another format version is converted again; writing a new conversion deletes
the stale ones beside it.

``<cache>`` is the ``cache_dir`` argument, else ``$SAM_MLX_CACHE``, else ``$HF_HOME/sam_mlx``.
Downloads go through ``huggingface_hub.hf_hub_download`` (its own progress bars and its
own cache of the raw file); ``HF_HUB_OFFLINE=1`` forbids them.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import threading
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from ..io.atomic import remove_abandoned_temporaries
from .load import DTYPES, FORMAT_VERSION, load_checkpoint, save_model

#: Short model names -> (Hub repo, file). The facebook, syscv-community, nielsr (SlimSAM) and wanglab (MedSAM)
#: repos hold transformers-format weights; dhkim2810/MobileSAM MobileSAM's official mobile_sam.pt and lkeab/hq-sam
#: HQ-SAM's original checkpoints, of which only Light HQ-SAM (TinyViT) has no transformers version.
MODEL_NAMES: dict[str, tuple[str, str]] = {
    **{f"sam-vit-{size}": (f"facebook/sam-vit-{size}", "model.safetensors") for size in ("base", "large", "huge")},
    "vit_b": ("facebook/sam-vit-base", "model.safetensors"),
    "vit_l": ("facebook/sam-vit-large", "model.safetensors"),
    "vit_h": ("facebook/sam-vit-huge", "model.safetensors"),
    "mobile_sam": ("dhkim2810/MobileSAM", "mobile_sam.pt"),
    **{f"sam-hq-vit-{size}": (f"syscv-community/sam-hq-vit-{size}", "model.safetensors")
       for size in ("base", "large", "huge")},
    "sam-hq-vit-tiny": ("lkeab/hq-sam", "sam_hq_vit_tiny.pth"),
    "slimsam-50": ("nielsr/slimsam-50-uniform", "model.safetensors"),
    "slimsam-77": ("nielsr/slimsam-77-uniform", "model.safetensors"),
    "medsam": ("wanglab/medsam-vit-base", "pytorch_model.bin"),
}
#: Seconds to wait for a TCP connection to the Hub before taking it as unreachable.
REACHABLE_TIMEOUT = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
DEFAULT_FILE = "model.safetensors"
# Checkpoint files looked for in a repo or folder without model.safetensors, most preferred first.
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# "owner/name" or "owner/name:file" (the file picks one of several checkpoints in a repo).
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<file>[^:]+))?$")
_TRUE = ("1", "true", "yes", "on")


class HubError(RuntimeError):
    """A name, repo id or folder could not be resolved to one checkpoint file (offline, unreachable, none, several)."""


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The sam_mlx cache: ``cache_dir``, else ``$SAM_MLX_CACHE``, else ``$HF_HOME/sam_mlx``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("SAM_MLX_CACHE"):
        return Path(os.environ["SAM_MLX_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        hf_home = Path(os.environ["HF_HOME"])
    else:
        hf_home = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return hf_home.expanduser() / "sam_mlx"


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_reachable(timeout: float = REACHABLE_TIMEOUT) -> bool:
    """Whether a TCP connection to the Hub's host (``HF_ENDPOINT``) opens within ``timeout`` seconds.

    Checked before a download so that an offline machine fails at once, not after huggingface_hub's
    retries (~24 s). The name lookup runs in a thread too, as it has no timeout of its own. Behind a
    proxy (``HTTPS_PROXY``...) the host is not reached directly: the check says yes and leaves it to the client.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    address = (endpoint.hostname or "", endpoint.port or (80 if endpoint.scheme == "http" else 443))
    reached: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            reached.append(True)
        except OSError:
            reached.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached and reached[0])


def resolve_checkpoint(path_or_name: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Local path, model name or Hub repo id -> path of a sam_mlx safetensors file (or the input file).

    Local sam_mlx files are returned as they are; other local checkpoints (a file, or a
    folder holding one) are converted once into the cache. Names (``sam-vit-base``,
    ``vit_h``...) and repo ids (``owner/name``, ``owner/name:file``) are downloaded and
    converted once. Raises FileNotFoundError, HubError or CheckpointError.
    """
    text = str(path_or_name)
    cache = default_cache_dir(cache_dir)
    path = Path(text).expanduser()
    if path.exists():
        return _convert_local(_checkpoint_in(path) if path.is_dir() else path, cache)
    if text in MODEL_NAMES:
        repo, filename = MODEL_NAMES[text]
        return _from_hub(repo, filename, cache, explicit_file=False)
    match = _REPO_ID.match(text)
    if match and not _looks_like_path(match["repo"]):
        return _from_hub(match["repo"], match["file"], cache, explicit_file=match["file"] is not None)
    names = ", ".join(MODEL_NAMES)
    raise FileNotFoundError(
        f"checkpoint not found: {text} is not an existing file or folder, a model name ({names}) "
        "or a Hugging Face Hub repo id (owner/name)"
    )


def _looks_like_path(text: str) -> bool:
    """A missing 'dir/file.pth' or './x/y' is a mistyped path, not a Hub repo id."""
    return text.startswith((".", "~", "/")) or text.lower().endswith(CHECKPOINT_SUFFIXES)


def _checkpoint_in(folder: Path) -> Path:
    """The checkpoint inside a folder: model.safetensors, else the only checkpoint file."""
    if (folder / DEFAULT_FILE).is_file():
        return folder / DEFAULT_FILE
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return folder / _pick_checkpoint(files, f"folder {folder}")


def _pick_checkpoint(files: list[str], where: str) -> str:
    """One checkpoint among ``files``: the only one with the most preferred suffix, or raise."""
    for suffix in CHECKPOINT_SUFFIXES:
        found = [f for f in files if f.lower().endswith(suffix)]
        if len(found) == 1:
            return found[0]
        if found:
            raise HubError(f"{where} holds several {suffix} checkpoints ({', '.join(found)}): name one")
    shown = ", ".join(files[:10]) or "no files"
    raise HubError(f"{where} has no checkpoint ({'/'.join(CHECKPOINT_SUFFIXES)} file); it has {shown}")


def _sam_mlx_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a safetensors file written by ``save_model``, else None (only its header is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception:  # not safetensors at all: conversion will report what it is
        return None
    return metadata if "sam_mlx_config" in metadata else None


def _is_current_conversion(path: Path) -> bool:
    """A cached conversion this sam_mlx can load as it is."""
    metadata = _sam_mlx_metadata(path) if path.is_file() else None
    return metadata is not None and metadata.get("format_version") == FORMAT_VERSION


def _hash(text: str, digits: int = 16) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:digits]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of sam_mlx's Python source, every sub-package's too: part of every cache key (read once per process)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        digest.update(source.relative_to(package).as_posix().encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def _convert_local(path: Path, cache: Path) -> Path:
    """Convert a local foreign checkpoint once; the cache key changes whenever the file or sam_mlx does."""
    if _sam_mlx_metadata(path) is not None:
        return path
    resolved, stat = path.resolve(), path.stat()
    folder = cache / "local" / f"{path.stem}-{_hash(str(resolved), 12)}"
    target = folder / f"{_hash(f'{stat.st_size}:{stat.st_mtime_ns}:{code_version()}')}.safetensors"
    if _is_current_conversion(target):
        return target
    return _convert(path, target, source=str(resolved))


def _lossless_dtype(model) -> str:
    """The smallest dtype holding every weight exactly: a float16 checkpoint stays half the size."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = [v for _, v in tree_flatten(model.parameters())]
    for name in ("float16", "bfloat16"):
        if all(mx.array_equal(v.astype(DTYPES[name]).astype(v.dtype), v).item() for v in weights):
            return name
    return "float32"


def _convert(path: Path, target: Path, source: str) -> Path:
    """Convert ``path`` into ``target`` atomically, without loss, and drop stale siblings.

    If the cache cannot be written, ``path`` itself is returned: still loadable, just
    converted again on every load.
    """
    import mlx.core as mx

    model = load_checkpoint(path, dtype=mx.float32)  # not the device's default (half-precision encoder on a GPU)
    try:
        save_model(model, target, dtype=_lossless_dtype(model), source=source)
    except OSError as exc:
        warnings.warn(f"could not cache the converted {path} in {target.parent} ({exc})", stacklevel=4)
        return path
    for stale in target.parent.glob("*.safetensors"):
        if stale != target and not stale.name.startswith("."):  # not another process's temporary
            stale.unlink(missing_ok=True)
    remove_abandoned_temporaries(target.parent)  # those of killed conversions
    return target


def _slug(repo: str) -> str:
    return repo.replace("/", "--")


def _from_hub(repo: str, filename: str | None, cache: Path, explicit_file: bool) -> Path:
    """Cached conversion of a Hub checkpoint, else find it (local copies first), download and convert."""
    folder = cache / "hub" / (f"{_slug(repo)}--{_slug(filename)}" if explicit_file else _slug(repo))
    target = folder / f"{code_version()}.safetensors"
    if _is_current_conversion(target):
        return target
    source = _manual_download(repo, filename, cache) or _download(repo, filename, cache)
    return _convert(source, target, source=f"hf://{repo}/{source.name}")


def _manual_download(repo: str, filename: str | None, cache: Path) -> Path | None:
    """A file the user put in ``<cache>/downloads/<owner>--<name>/``, if any."""
    folder = cache / "downloads" / _slug(repo)
    if not folder.is_dir():
        return None
    if filename:
        return folder / filename if (folder / filename).is_file() else None
    if not any(p.name.lower().endswith(CHECKPOINT_SUFFIXES) for p in folder.iterdir()):
        return None
    return _checkpoint_in(folder)


def _download(repo: str, filename: str | None, cache: Path) -> Path:
    """Fetch the checkpoint with huggingface_hub (its own cache is tried first when offline)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = is_offline()
    local_only = offline or not hub_reachable()  # then only huggingface_hub's cache is looked in
    wanted = filename or DEFAULT_FILE
    try:
        try:
            return Path(huggingface_hub.hf_hub_download(repo, wanted, library_name="sam_mlx",
                                                        local_files_only=local_only))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError, handled below
            raise
        except EntryNotFoundError:
            if filename:
                raise HubError(f"Hub repo {repo} has no file {wanted}") from None
        # No model.safetensors: look for another checkpoint file in the repo.
        chosen = _pick_checkpoint(huggingface_hub.list_repo_files(repo), f"Hub repo {repo}")
        return Path(huggingface_hub.hf_hub_download(repo, chosen, library_name="sam_mlx"))
    except LocalEntryNotFoundError:  # offline, or the Hub is unreachable, and not in HF's cache
        reason = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face Hub could not be reached"
        raise HubError(f"{repo} is not cached and {reason}. {_manual_hint(repo, filename, cache)}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"no Hub repo {repo} (or it is private or gated: log in with `hf auth login`, "
            "or `huggingface-cli login` with huggingface_hub older than 0.34)"
        ) from None
    except HubError:
        raise
    except Exception as exc:  # network and HTTP errors of whichever HTTP library huggingface_hub uses
        raise HubError(f"downloading {repo} failed ({exc}). {_manual_hint(repo, filename, cache)}") from None


def _manual_hint(repo: str, filename: str | None, cache: Path) -> str:
    """How to fetch the file by hand and where ``_manual_download`` looks for it."""
    where = f"put it in {cache / 'downloads' / _slug(repo)}/, or pass the file's path instead of the name"
    if filename is None:
        return f"Download the repo's checkpoint file from https://huggingface.co/{repo}/tree/main and {where}"
    return (
        f"Download https://huggingface.co/{repo}/resolve/main/{filename} (or, where the Hub is reachable, run "
        f"`hf download {repo} {filename}`; `huggingface-cli download {repo} {filename}` with huggingface_hub "
        f"older than 0.34) and {where}"
    )
