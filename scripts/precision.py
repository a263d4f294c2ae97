#!/usr/bin/env python
"""How far a half-precision image encoder moves SAM's outputs from float32, on the shared prompts.

For each precision asked for, the shared MobileSAM checkpoint with its image encoder in that precision
(the rest float32, as sam_mlx loads it on a GPU) against the same model in float32, on every shared
photo at the original sizing: the image tokens' largest difference, the scores' largest difference,
and the smallest IoU of a prompt's best mask (by the float32 score) between the two.

On a Mac this measures the GPU that MLX computes on. Elsewhere, ``--gpu-branches`` makes sam_mlx take
its GPU branches on the CPU device (MLX's fused attention, LayerNorm and softmax, one band, a
batch's prompts decoded together): the code a Mac runs, though not Metal's kernels. Half precision
is slow on the CPU (~25 s per float16 encoding on the 2-core development machine).

    python scripts/precision.py --gpu-branches --dtypes float16,bfloat16 --json precision.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import numpy as np  # noqa: E402

from helpers import MOBILE_SAM, PHOTOS, best_mask_ious, gpu_branches, shared_prompt_outputs  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402  (after sam_mlx, imported by helpers: OpenBLAS first)

import sam_mlx  # noqa: E402


def compare(full: dict, other: dict) -> dict[str, Any]:
    """Two runs of ``shared_prompt_outputs`` on one photo -> their largest differences."""
    scores = [np.abs(full[k][1] - other[k][1]).max() for k in full if k != "tokens"]
    return {
        "tokens_max_difference": float(np.abs(full["tokens"] - other["tokens"]).max()),
        "scores_max_difference": float(max(scores)),
        "best_mask_iou": best_mask_ious(full, other),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="float16,bfloat16", help="encoder precisions to compare with float32")
    parser.add_argument("--photos", default=",".join(PHOTOS))
    parser.add_argument("--gpu-branches", action="store_true", help="take sam_mlx's GPU branches on any device")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    dtypes, photos = args.dtypes.split(","), args.photos.split(",")
    checkpoint = str(MOBILE_SAM)
    results: dict[str, Any] = {"gpu_branches": args.gpu_branches, "device": str(mx.default_device())}
    with gpu_branches() if args.gpu_branches else contextlib.nullcontext():
        full = {photo: shared_prompt_outputs(sam_mlx.load(checkpoint, dtype="float32"), photo) for photo in photos}
        for dtype in dtypes:
            model = sam_mlx.load(checkpoint, dtype="float32")
            model.image_encoder.set_dtype(sam_mlx.DTYPES[dtype])
            for photo in photos:
                print(f"{dtype}: {photo}", file=sys.stderr, flush=True)
                results[f"{dtype}/{photo}"] = compare(full[photo], shared_prompt_outputs(model, photo))
    print(f"{'encoder':9} {'photo':10} {'tokens':>9} {'scores':>9} {'best-mask IoU (min)':>20}")
    for key, row in (kv for kv in results.items() if "/" in kv[0]):
        dtype, photo = key.split("/")
        print(f"{dtype:9} {photo:10} {row['tokens_max_difference']:9.2e} {row['scores_max_difference']:9.2e} "
              f"{min(row['best_mask_iou'].values()):20.4f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
