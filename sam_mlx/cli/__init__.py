"""The ``sam-mlx`` command: segment images from the shell, cache their encodings, convert checkpoints.

Every error ends as one line on stderr and a non-zero exit code (1, or 2 for bad
arguments); ``--debug`` re-raises it with its traceback.

Modules, each importing only those before it: ``messages`` (CliError, one-line errors, --json records),
``prompts``, ``jobs`` (a run's images and ``ImageWork``, shared with ``sam_mlx.ray_data``), ``outputs`` (an
image's files as one set), ``work`` (each command's work on one image), ``run`` (the images here or on Ray,
reports), ``commands``, ``parsing`` (the argument parser); ``main`` here.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

from .jobs import ImageDone, ImageFailed, ImageJob, ImageWork
from .messages import CliError, _log, _one_line
from .parsing import build_parser
from .prompts import Prompt, read_prompts
from .work import segment_prompts

__all__ = ["CliError", "ImageDone", "ImageFailed", "ImageJob", "ImageWork", "Prompt", "build_parser", "main",
           "read_prompts", "segment_prompts"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sam-mlx`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # warnings as one line too, restored on return
            warnings.showwarning = lambda message, *_, **__: _log(f"sam-mlx {args.command}: warning: {message}")
            code = args.func(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        _log("sam-mlx: interrupted")
        return 130
    except BrokenPipeError:  # the reader of stdout went away (| head): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # 128 + SIGPIPE: the code a shell shows for a tool that a closed pipe ended
    except Exception as exc:
        if args.debug:
            raise
        _log(f"sam-mlx {args.command}: error: {_one_line(exc)}")
        return 1
    return code
