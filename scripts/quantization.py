#!/usr/bin/env python
"""What quantizing the image encoder's Linear weights to 8 or 4 bits saves and costs (``load(..., quantize=N)``).

- bytes: every weight's bytes as loaded (float32 elsewhere; packed integers, scales and offsets where quantized),
  and MLX's peak memory while loading, for random-weight ViT-B / ViT-L / ViT-H files (sam_mlx safetensors in
  float32, written first) and MobileSAM's real checkpoint;
- drift against float32: MobileSAM's real weights on every shared photo and every shared prompt (the image
  tokens' largest difference, the scores' largest difference and the smallest IoU of a prompt's best mask, as
  ``scripts/precision.py``), and a random-weight ViT-B (``scripts/device_check.py``'s synthetic photo, three points);
- time: one encoding on this machine's device (after a first), per model and bits.

    python scripts/quantization.py --json quantization.json        # ~10 minutes on 2 CPU cores

Random ViT-L and ViT-H are loaded for bytes and peak memory only (``--encode vit_b`` chooses the encoded ones).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from device_check import agreement, build, outputs, random_vit, test_image  # noqa: E402

from helpers import MOBILE_SAM, PHOTOS, best_mask_ious, shared_prompt_outputs  # noqa: E402

# isort: split
import mlx.core as mx  # noqa: E402  (after sam_mlx, imported by the helpers: OpenBLAS first)
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import sam_mlx  # noqa: E402
from sam_mlx.config import ViTConfig  # noqa: E402
from sam_mlx.io.atomic import atomic_write  # noqa: E402
from sam_mlx.ops.blas import blas_description  # noqa: E402

VITS = {"vit_b": ViTConfig(),
        "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096,
                           global_attention_blocks=(5, 11, 17, 23)),
        "vit_h": ViTConfig(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120,
                           global_attention_blocks=(7, 15, 23, 31))}
BITS = (None, 8, 4)


def weight_bytes(model: sam_mlx.Sam) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def load_measured(path: Path, bits: int | None) -> tuple[sam_mlx.Sam, dict[str, Any]]:
    """Load ``path`` quantized to ``bits``; its weights' bytes and MLX's peak memory while loading."""
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    started = time.perf_counter()
    model = sam_mlx.load(str(path), quantize=bits)
    return model, {"weight_bytes": weight_bytes(model), "load_peak_bytes": mx.get_peak_memory() - before,
                   "load_seconds": time.perf_counter() - started}


def encode_seconds(model: sam_mlx.Sam, image: np.ndarray) -> float:
    predictor = sam_mlx.SamPredictor(model)
    predictor.set_image(image)  # the first: compiled kernels, buffers
    started = time.perf_counter()
    predictor.set_image(image)
    return time.perf_counter() - started


def mobile_sam_drift(models: dict[Any, sam_mlx.Sam]) -> dict[str, Any]:
    """Per photo and bits: the shared prompts' drift from float32."""
    results: dict[str, Any] = {}
    for photo in PHOTOS:
        full = shared_prompt_outputs(models[None], photo)
        results[photo] = {}
        for bits in BITS[1:]:
            other = shared_prompt_outputs(models[bits], photo)
            scores = max(float(np.abs(other[k][1] - full[k][1]).max()) for k in full if k != "tokens")
            ious = best_mask_ious(full, other)
            results[photo][f"q{bits}"] = {
                "tokens_max_diff": float(np.abs(other["tokens"] - full["tokens"]).max()),
                "tokens_max": float(np.abs(full["tokens"]).max()), "scores_max_diff": scores,
                "best_mask_iou_min": min(ious.values()), "prompts": len(ious)}
            print(f"mobile_sam {photo} q{bits}: {results[photo][f'q{bits}']}", file=sys.stderr, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--encode", default="vit_b", help="comma-separated random ViTs to encode and time (vit_b)")
    parser.add_argument("--folder", type=Path, help="where the random ViT files go (default: a temporary folder)")
    args = parser.parse_args()
    encoded = set(args.encode.split(","))
    image = test_image(1024)
    results: dict[str, Any] = {"device": str(mx.default_device()), "mlx": mx.__version__, "blas": blas_description(),
                               "models": {}}
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.folder or Path(temporary)
        for name, config in VITS.items():
            path = folder / f"random_{name}.safetensors"
            if not path.exists():
                random_model = build(config, random_vit(config), mx.float32)
                sam_mlx.save_model(random_model, path)
                del random_model
            entry: dict[str, Any] = {}
            reference = None
            for bits in BITS:
                model, entry[f"q{bits}" if bits else "float32"] = load_measured(path, bits)
                if name in encoded:
                    measured = entry[f"q{bits}" if bits else "float32"]
                    measured["encode_seconds"] = encode_seconds(model, image)
                    runs = outputs(model, image, ("original", 1024))
                    if reference is None:
                        reference = runs
                    else:
                        measured["drift"] = agreement(reference, runs)
                del model
                print(f"{name} q{bits}: {entry[f'q{bits}' if bits else 'float32']}", file=sys.stderr, flush=True)
            results["models"][name] = entry
    path = MOBILE_SAM
    entry, models = {}, {}
    for bits in BITS:
        models[bits], entry[f"q{bits}" if bits else "float32"] = load_measured(path, bits)
        entry[f"q{bits}" if bits else "float32"]["encode_seconds"] = encode_seconds(models[bits], image)
    entry["drift"] = mobile_sam_drift(models)
    results["models"]["mobile_sam"] = entry
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
