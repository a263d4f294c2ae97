"""Resolve a model name, Hub repo id or path to a local checkpoint file."""

from __future__ import annotations

from pathlib import Path


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    raise FileNotFoundError(f"checkpoint not found: {path_or_name}")
