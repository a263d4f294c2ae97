#!/usr/bin/env python
"""Regenerate the pictures in docs/ that README.md and the docs show, with the `sam-mlx` command itself.

    python scripts/readme_figures.py [--model ../shared/weights/mobile_sam.pt] [--only truck_cutout.jpg]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MLX_SHARED", ROOT.parent / "shared"))
FIGURES = {
    # docs file: sam-mlx arguments (the image comes first)
    "truck_point.jpg": ["segment", "truck.jpg", "--point", "500,375"],
    "truck_box_point.jpg": ["segment", "truck.jpg", "--box", "75,275,1725,850", "--point", "500,375"],
    "groceries_boxes.jpg": ["segment", "groceries.jpg", "--box", "365,160,450,345", "--box", "440,85,645,345"],
    "dog_everything.jpg": ["everything", "dog.jpg"],
    # the shared prompt whose stretch masks differ most from the original's (docs/api.md, "Sizing")
    "groceries_item_box_original.jpg": ["segment", "groceries.jpg", "--box", "100,150,350,480", "--multimask"],
    "groceries_item_box_stretch.jpg": ["segment", "groceries.jpg", "--box", "100,150,350,480",
                                       "--sizing", "stretch", "--size", "1024", "--multimask"],
    # a cut-out (docs/command.md, "Export"), shown on a checkerboard where it is transparent
    "truck_cutout.jpg": ["segment", "truck.jpg", "--box", "75,275,1725,850", "--export", "cutout"],
}


def on_checkerboard(picture: Image.Image, square: int = 24) -> Image.Image:
    """An RGBA picture over light grey squares, as image editors show transparency."""
    rows, cols = np.indices((picture.height, picture.width)) // square
    board = np.where(((rows + cols) % 2)[..., None] == 0, 235, 200).astype(np.uint8).repeat(3, axis=2)
    return Image.alpha_composite(Image.fromarray(board).convert("RGBA"), picture.convert("RGBA")).convert("RGB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "weights" / "mobile_sam.pt"))
    parser.add_argument("--width", type=int, default=900, help="width of the saved pictures")
    parser.add_argument("--only", choices=sorted(FIGURES), action="append", help="make only this picture")
    args = parser.parse_args()
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    for name, (command, image, *options) in FIGURES.items():
        if args.only and name not in args.only:
            continue
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "sam_mlx.cli", command, str(SHARED / "images" / image),
                   "--model", args.model, "--out-dir", out, *options]
            print(" ".join(["sam-mlx", *cmd[3:]]), file=sys.stderr)
            subprocess.run(cmd, check=True)
            cutouts = sorted(Path(out).glob("*_cutout*.png"))
            if cutouts:
                picture = on_checkerboard(Image.open(cutouts[0]))
            else:
                picture = Image.open(next(Path(out).glob("*_overlay.png"))).convert("RGB")
            picture.thumbnail((args.width, args.width))
            picture.save(docs / name, quality=85)
    return 0


if __name__ == "__main__":
    sys.exit(main())
