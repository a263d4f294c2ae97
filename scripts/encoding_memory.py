#!/usr/bin/env python
"""How much memory one encoding takes, measured, against ``resources.encoding_memory``'s estimate.

For each model and square stretch size, a fresh process loads the model (MobileSAM's real weights, or a random
ViT-B), notes its peak RSS (VmHWM), encodes a random image of that size and prints how much the peak grew,
next to the estimate the predictor checks sizes with.

    python scripts/encoding_memory.py --models mobile_sam,vit_b --sizes 256,512,1024
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MLX_SHARED", ROOT.parent / "shared"))

CHILD = """
import sys
from pathlib import Path
import numpy as np
import sam_mlx
import mlx.core as mx
from sam_mlx.config import SamConfig
from sam_mlx.modeling.sam import Sam
from sam_mlx.ops.backend import on_cpu
from sam_mlx.resources import encoding_memory

def peak_mb():
    status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024

name, size = sys.argv[1], int(sys.argv[2])
if name == "mobile_sam":
    model = sam_mlx.load_checkpoint(sys.argv[3])
else:
    model = Sam(SamConfig())
    mx.eval(model.parameters())
predictor = sam_mlx.SamPredictor(model, sizing="stretch", size=(size, size))
before = peak_mb()
predictor.set_image(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
estimate = encoding_memory(model.config, (size, size), on_cpu()) / 2**20
print(f"| {name} | {size} | {peak_mb() - before:.0f} | {estimate:.0f} |")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobile_sam,vit_b")
    parser.add_argument("--sizes", default="256,512,1024")
    args = parser.parse_args()
    print("| model | size | peak RSS growth (MB) | estimate (MB) |\n|---|---|---|---|")
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            command = [sys.executable, "-c", CHILD, name, size, str(SHARED / "weights" / "mobile_sam.pt")]
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            print(result.stdout.strip() if result.returncode == 0 else f"| {name} | {size} | failed: "
                  f"{result.stderr.strip().splitlines()[-1]} | |", flush=True)


if __name__ == "__main__":
    main()
