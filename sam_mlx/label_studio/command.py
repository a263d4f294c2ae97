"""``sam-mlx label-studio``: its options and its run (the parser is the command's; nothing here needs Starlette
until ``run``).

Secrets come from the environment only, as Label Studio's own backends read them (a command line is visible to
every user of the machine): ``LABEL_STUDIO_API_KEY``, ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's own options (the model options --model / --sizing / --size come from the command's parents)."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1; another one needs BASIC_AUTH_USER and "
                        "BASIC_AUTH_PASS, set the same in Label Studio's model settings)")
    parser.add_argument("--port", type=_non_negative_int, default=9090, metavar="N",
                        help="port (default: 9090; 0: any free one)")
    parser.add_argument("--label-studio-url", metavar="URL", default=os.environ.get("LABEL_STUDIO_URL"),
                        help="Label Studio's address, to fetch uploaded images with LABEL_STUDIO_API_KEY "
                        "(default: $LABEL_STUDIO_URL)")
    parser.add_argument("--document-root", metavar="DIR",
                        default=(os.environ.get("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
                                 or os.environ.get("LOCAL_FILES_DOCUMENT_ROOT")),
                        help="read Local Storage images (/data/local-files/?d=...) from this folder instead of "
                        "through Label Studio (default: $LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="HOST",
                        help="also fetch http(s) task images from this host, without Label Studio's key "
                        "(repeatable; default: only Label Studio's host)")
    parser.add_argument("--tokens-dir", metavar="DIR",
                        help="image tokens cache, shared with `sam-mlx app` (default: the model cache's app_tokens)")
    parser.add_argument("--tokens-cache-mb", type=_non_negative_int, default=2048, metavar="MB",
                        help="keep the tokens cache under this size, the files used longest ago removed first "
                        "(default: 2048)")
    parser.add_argument("--segment-everything", action="store_true",
                        help="answer tasks without a click (pre-annotation) with every mask of segment everything "
                        "(default: encode their images ahead of the first click)")
    parser.add_argument("--everything-points", type=_non_negative_int, default=32, metavar="N",
                        help="segment everything's N x N point grid (default: 32)")
    parser.add_argument("--max-request-mb", type=_non_negative_int, default=16, metavar="MB",
                        help="refuse request bodies larger than this (default: 16)")
    parser.add_argument("--max-image-mb", type=_non_negative_int, default=64, metavar="MB",
                        help="refuse task images larger than this (default: 64)")


def run(args: argparse.Namespace, model) -> None:
    """Serve the backend with the parsed options until Ctrl+C / SIGTERM."""
    from ..checkpoints.hub import default_cache_dir
    from .backend import SamBackend
    from .images import ImageSource
    from .server import serve

    user, password = os.environ.get("BASIC_AUTH_USER"), os.environ.get("BASIC_AUTH_PASS")
    if bool(user) != bool(password):
        raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS for basic auth, or neither")
    if args.everything_points < 1:
        raise ValueError("--everything-points must be at least 1")
    images = ImageSource(args.label_studio_url, os.environ.get("LABEL_STUDIO_API_KEY"),
                         Path(args.document_root) if args.document_root else None, tuple(args.allow_host),
                         max_bytes=args.max_image_mb << 20)
    tokens_dir = Path(args.tokens_dir) if args.tokens_dir else default_cache_dir() / "app_tokens"
    backend = SamBackend(model, images, tokens_dir, args.sizing or "original", args.size,
                         tokens_cache_bytes=args.tokens_cache_mb << 20, segment_everything=args.segment_everything,
                         everything_points=args.everything_points,
                         log=lambda message: print(message, file=sys.stderr, flush=True))
    announce = (lambda info: print(json.dumps(info), flush=True)) if getattr(args, "json", False) else None
    serve(backend, args.host, args.port, (user, password) if user else None, args.max_request_mb << 20,
          announce=announce)
