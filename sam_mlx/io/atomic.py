"""Atomic file writes: a file is either its old self or complete, never half-written; a set of files is
replaced together or not at all (``one_set_of_files``)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..resources import format_bytes


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
