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
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SAM_MLX_SHARED", ROOT.parent / "shared"))
PHOTOS = ("dog", "truck", "groceries")

import numpy as np  # noqa: E402

import sam_mlx  # noqa: E402  (before mlx: loads OpenBLAS on Linux)
import mlx.core as mx  # noqa: E402
from sam_mlx.checkpoints.load import DTYPES  # noqa: E402


@contextlib.contextmanager
def gpu_branches() -> Iterator[None]:
    """Inside this block sam_mlx takes its GPU branches whatever the device: ``on_cpu`` answers False
    in every sam_mlx module that reads it (models loaded inside also get the GPU's default precision)."""
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("sam_mlx") and hasattr(m, "on_cpu")]
    saved = [m.on_cpu for m in modules]
    for module in modules:
        module.on_cpu = lambda: False
    try:
        yield
    finally:
        for module, on_cpu in zip(modules, saved):
            module.on_cpu = on_cpu


def prompt_keywords(prompt: dict) -> dict:
    """A shared reference prompt ({"points", "labels"} and/or "box") as ``SamPredictor.predict`` keywords."""
    kwargs = {"box": np.array(prompt["box"], np.float64)} if "box" in prompt else {}
    if "points" in prompt:
        kwargs.update(point_coords=np.array(prompt["points"], np.float64), point_labels=np.array(prompt["labels"]))
    return kwargs


def shared_prompt_outputs(model: sam_mlx.Sam, photo: str) -> dict[Any, Any]:
    """Every shared prompt of ``photo`` at the original sizing -> {"tokens": 1 x C x h x w float32,
    (prompt, "multi" | "single" | "hint"): predict's (masks, scores, low-res logits), ("batch", "multi"):
    predict_batch's of two points}. "hint" feeds back the best of the 3 masks' low-res logits."""
    prompts = json.loads((SHARED / "reference" / "mobile_sam" / f"{photo}.json").read_text())["prompts"]
    predictor = sam_mlx.SamPredictor(model)
    predictor.set_image(str(SHARED / "images" / f"{photo}.jpg"))
    out: dict[Any, Any] = {"tokens": predictor.get_image_embedding().astype(np.float32)}
    for prompt in prompts:
        kwargs = prompt_keywords(prompt)
        multi = predictor.predict(**kwargs)
        out[prompt["name"], "multi"] = multi
        out[prompt["name"], "single"] = predictor.predict(**kwargs, multimask_output=False)
        hint = multi[2][[int(np.argmax(multi[1]))]]
        out[prompt["name"], "hint"] = predictor.predict(**kwargs, mask_input=hint, multimask_output=False)
    h, w = predictor.original_size
    points = np.array([[[w / 3, h / 2]], [[2 * w / 3, h / 3]]])
    out["batch", "multi"] = predictor.predict_batch(points, np.ones((2, 1), np.int32))
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def best_mask_ious(full: dict, other: dict) -> dict[Any, float]:
    """Per 3-mask prompt of ``shared_prompt_outputs``: the IoU between the two runs' masks at the index
    of the best float32 (``full``) score; the smallest of a batch's prompts."""
    ious = {}
    for key in (k for k in full if k != "tokens" and k[1] == "multi"):
        (masks, scores, _), (other_masks, _, _) = full[key], other[key]
        masks, other_masks = (m.reshape(-1, *m.shape[-3:]) for m in (masks, other_masks))  # B x C x H x W
        per_prompt = []
        for prompt_masks, prompt_other, prompt_scores in zip(masks, other_masks, scores.reshape(len(masks), -1)):
            best = int(np.argmax(prompt_scores))
            per_prompt.append(mask_iou(prompt_masks[best], prompt_other[best]))
        ious[key[0]] = min(per_prompt)
    return ious


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
    checkpoint = str(SHARED / "weights" / "mobile_sam.pt")
    results: dict[str, Any] = {"gpu_branches": args.gpu_branches, "device": str(mx.default_device())}
    with gpu_branches() if args.gpu_branches else contextlib.nullcontext():
        full = {photo: shared_prompt_outputs(sam_mlx.load(checkpoint, dtype="float32"), photo) for photo in photos}
        for dtype in dtypes:
            model = sam_mlx.load(checkpoint, dtype="float32")
            model.image_encoder.set_dtype(DTYPES[dtype])
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
