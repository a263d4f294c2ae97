#!/usr/bin/env python
"""What a model's fingerprint costs next to loading the model: a random ViT-H-shaped sam_mlx file (2.56 GB float32).

The file is made once (``--file``, default in the system's temporary folder), then each round loads it in this
process (``load_checkpoint``) and computes ``model_fingerprint`` (SHA-256 of every weight's bytes), printing
both times. The first round reads the file from disk; later ones mostly from the page cache.

    python scripts/fingerprint_cost.py --rounds 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import sam_mlx  # noqa: E402,F401  (before mlx: loads OpenBLAS on Linux)
from sam_mlx.checkpoints.load import load_checkpoint, save_model  # noqa: E402
from sam_mlx.config import SamConfig, ViTConfig  # noqa: E402
from sam_mlx.io.tokens import model_fingerprint  # noqa: E402
from sam_mlx.modeling.sam import Sam  # noqa: E402

VIT_H = ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attention_blocks=(7, 15, 23, 31), mlp_dim=5120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path(tempfile.gettempdir()) / "sam_mlx_vit_h_random.safetensors")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.file.is_file():
        model = Sam(SamConfig(encoder=VIT_H))
        mx.eval(model.parameters())
        save_model(model, args.file, source="random ViT-H-shaped weights")
        del model
    for round_ in range(1, args.rounds + 1):
        start = time.perf_counter()
        model = load_checkpoint(args.file)
        loaded = time.perf_counter()
        fingerprint = model_fingerprint(model)
        done = time.perf_counter()
        size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        print(f"round {round_}: {size / 1e9:.2f} GB: load {loaded - start:.2f} s, fingerprint {done - loaded:.2f} s "
              f"({size / (done - loaded) / 1e9:.2f} GB/s) [{fingerprint}]", flush=True)
        del model


if __name__ == "__main__":
    main()
