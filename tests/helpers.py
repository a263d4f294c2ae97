"""What several tests (and ``scripts/precision.py``) share: the shared data's paths, its prompts, and the
switch that makes sam_mlx take its GPU branches on the CPU device."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

import sam_mlx  # before mlx: loads OpenBLAS on Linux
from sam_mlx.ops import backend

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MLX_SHARED", ROOT.parent / "shared"))
IMAGES = SHARED / "images"
MOBILE_SAM = SHARED / "weights" / "mobile_sam.pt"
REFERENCE = SHARED / "reference" / "mobile_sam"
PHOTOS = ("dog", "truck", "groceries")


@contextlib.contextmanager
def gpu_branches() -> Iterator[None]:
    """Inside this block sam_mlx takes its GPU branches whatever the device: ``backend.on_cpu`` answers False
    (models loaded inside also get the GPU's default precision)."""
    on_cpu = backend.on_cpu
    backend.on_cpu = lambda: False
    try:
        yield
    finally:
        backend.on_cpu = on_cpu


def predict_kwargs(prompt: dict) -> dict:
    """A shared reference prompt ({"points", "labels"} and/or "box") as ``SamPredictor.predict`` keywords."""
    kwargs = {"box": np.array(prompt["box"], np.float64)} if "box" in prompt else {}
    if "points" in prompt:
        kwargs.update(point_coords=np.array(prompt["points"], np.float64), point_labels=np.array(prompt["labels"]))
    return kwargs


def shared_prompts(photo: str) -> list[dict]:
    return json.loads((REFERENCE / f"{photo}.json").read_text())["prompts"]


def shared_prompt_outputs(model: sam_mlx.Sam, photo: str) -> dict[Any, Any]:
    """Every shared prompt of ``photo`` at the original sizing -> {"tokens": 1 x C x h x w float32,
    (prompt, "multi" | "single" | "hint"): predict's (masks, scores, low-res logits), ("batch", "multi"):
    predict_batch's of two points}. "hint" feeds back the best of the 3 masks' low-res logits."""
    predictor = sam_mlx.SamPredictor(model)
    predictor.set_image(str(IMAGES / f"{photo}.jpg"))
    out: dict[Any, Any] = {"tokens": predictor.get_image_embedding().astype(np.float32)}
    for prompt in shared_prompts(photo):
        kwargs = predict_kwargs(prompt)
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


@st.composite
def mask_axes(draw) -> tuple[int, int, int, int]:
    """(low_res, padded, valid, original) sizes along one axis of SAM's mask post-processing; SAM's own 256 -> 1024
    often (for hypothesis)."""
    low = draw(st.just(256) | st.integers(1, 64))
    padded = draw(st.just(1024) | st.integers(1, 512))
    return low, padded, draw(st.integers(1, padded)), draw(st.integers(1, 1500))
