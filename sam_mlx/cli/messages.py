"""What the command tells its user: errors as one line, messages on stderr, --json records on stdout."""

from __future__ import annotations

import argparse
import json
import sys

from ..checkpoints.hub import HubError


class CliError(Exception):
    """A user-facing failure: its message is printed as is, without a traceback."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CliError, ValueError, OSError, HubError, ImportError)):  # CheckpointError is a ValueError
        return text
    return f"{type(exc).__name__}: {text} (unexpected: run with --debug for the traceback)"


def _plural(number: int, noun: str) -> str:
    """``1 mask``, ``3 masks``: a count with its noun in agreement."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, record: dict, out=None) -> None:
    """With --json, one JSON object on a line of stdout (or ``out``; messages and progress stay on stderr)."""
    if getattr(args, "json", False):
        print(json.dumps(record), file=out or sys.stdout, flush=True)
