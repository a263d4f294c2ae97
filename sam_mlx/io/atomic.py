"""Atomic file writes: a file is either its old self or complete, never half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` then rename into place, so readers never see a partial file.

    The temporary (hidden: ``.<name>.<random>.tmp<suffix>``) is locked while written, so
    ``remove_abandoned_temporaries`` deletes those of killed writers but never a live one.
    """
    path = Path(path)
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
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_abandoned_temporaries(folder: Path) -> None:
    """Delete ``atomic_write`` temporaries in ``folder`` that nobody is writing (their writer was killed)."""
    for tmp in folder.glob(".*.tmp*"):
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
