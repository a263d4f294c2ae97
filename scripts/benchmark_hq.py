"""HQ-SAM: sam_mlx against SysCV's PyTorch segment_anything_hq, the same random-weight checkpoint, truck.jpg.

Each framework runs in its own worker process, the two alternating for ``--rounds`` rounds, so that a slow spell of
a shared machine falls on both. A worker loads the checkpoint, encodes the photo ``--runs`` times (after one
warm-up) and decodes a point prompt 12 times (after one warm-up) with ``multimask_output`` on, then off with
``hq_token_only``: every time is the median of its runs over all rounds, and the table gives sam_mlx's speed-up.

    python scripts/benchmark_hq.py --model vit_b --rounds 2 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmark import timed  # scripts/benchmark.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
PHOTO = ROOT.parent / "shared" / "images" / "truck.jpg"
ENCODERS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
}
POINT = ([[500, 375]], [1])  # the truck's window
PROMPTS = {"prompt_s": dict(multimask_output=True), "prompt_hq_only_s": dict(multimask_output=False,
                                                                              hq_token_only=True)}


def worker(framework: str, checkpoint: str, runs: int) -> dict:
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(PHOTO).convert("RGB"))
    coords, labels = np.array(POINT[0]), np.array(POINT[1])
    if framework == "mlx":
        import sam_mlx

        predictor = sam_mlx.SamPredictor(sam_mlx.load(checkpoint))
        context = None
    else:
        import torch

        from reference import build_reference_hq_sam, reference_hq_predictor_class

        model = build_reference_hq_sam("vit", **ENCODERS[Path(checkpoint).stem])
        model.load_state_dict(torch.load(checkpoint, map_location="cpu"))
        predictor = reference_hq_predictor_class()(model.eval())
        context = torch.no_grad()
        context.__enter__()
    predictor.set_image(image)  # warm-up
    result = {"encode_s": timed(lambda: predictor.set_image(image), runs)}
    for key, kwargs in PROMPTS.items():
        predictor.predict(coords, labels, **kwargs)
        result[key] = timed(lambda kwargs=kwargs: predictor.predict(coords, labels, **kwargs), 12)
    if context is not None:
        context.__exit__(None, None, None)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(ENCODERS), default="vit_b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2, help="encodings timed per worker")
    parser.add_argument("--worker", choices=("mlx", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.runs)))
        return 0

    import torch

    from reference import build_reference_hq_sam

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / f"{args.model}.pth"
        torch.save(build_reference_hq_sam("vit", **ENCODERS[args.model]).state_dict(), checkpoint)
        times: dict[str, dict[str, list[float]]] = {"mlx": {}, "torch": {}}
        for round_ in range(args.rounds):
            for framework in ("mlx", "torch"):
                print(f"round {round_ + 1}/{args.rounds}: {framework} ...", file=sys.stderr, flush=True)
                out = subprocess.run([sys.executable, __file__, "--worker", framework, "--checkpoint", str(checkpoint),
                                      "--runs", str(args.runs)], capture_output=True, text=True, cwd=ROOT,
                                     env={**os.environ, "SAM_MLX_CACHE": str(Path(folder) / "cache")})
                if out.returncode:
                    raise SystemExit(f"the {framework} worker failed:\n{out.stderr}")
                for key, values in json.loads(out.stdout.strip().splitlines()[-1]).items():
                    times[framework].setdefault(key, []).extend(values)
    print(f"HQ-SAM {args.model}, random weights, {PHOTO.name}: medians, sam_mlx vs segment_anything_hq")
    for key in times["mlx"]:
        mlx, ref = statistics.median(times["mlx"][key]), statistics.median(times["torch"][key])
        print(f"  {key:18s} sam_mlx {mlx:8.3f} s   PyTorch {ref:8.3f} s   speed-up {ref / mlx:5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
