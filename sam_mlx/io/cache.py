"""The image tokens cache folder shared by ``sam-mlx app`` and ``sam-mlx label-studio``: kept under a size limit,
the files used longest ago removed first (a file's modification time is its last use); files of other names in
the folder are never touched."""

from __future__ import annotations

import re
from pathlib import Path

# A cached tokens file: image digest - model fingerprint - sizing - size (e.g. ``...-stretch-1024x768``).
TOKENS_NAME = re.compile(r"[0-9a-f]{32}-[0-9a-f]+-[a-z]+-[0-9x]+\.safetensors")


def trim_tokens_cache(folder: Path, keep: Path, limit_bytes: int) -> None:
    """Remove the tokens files of ``folder`` used longest ago until its tokens files fit ``limit_bytes``;
    ``keep`` (the file just written) is counted and never removed."""
    files = []
    for path in folder.iterdir():
        if TOKENS_NAME.fullmatch(path.name) and path != keep:
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed meanwhile (another process on the same folder)
                continue
            files.append((stat.st_mtime, stat.st_size, path))
    total = keep.stat().st_size + sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total <= limit_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
