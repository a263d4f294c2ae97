#!/usr/bin/env python
"""Time sam_mlx against the original PyTorch SAM in one run, on the same weights and photo.

Rows, per model (random ViT-B, random ViT-L, the shared MobileSAM):
  encode      image encoding at 1024 (set_image), median of --runs after a warm-up
  prompt      one point -> 3 masks at the original size (decoder + post-processing), median of 20
  everything  automatic mask generation on the photo, default settings (MobileSAM only: random
              weights give meaningless mask sets), one run after a warm-up decode
  peak RSS    the process's peak resident memory after loading and encoding

Each (framework, model) pair runs in its own fresh subprocess so peak memory is its own.
Meta's segment-anything has no TinyViT, so MobileSAM's encoding is timed for sam_mlx only;
PyTorch's MobileSAM rows run its prompt encoder / mask decoder on sam_mlx's embedding.

    python scripts/benchmark.py --models vit_b,mobile_sam --runs 3 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SAM_MLX_SHARED", ROOT.parent / "shared"))
RANDOM_MODELS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
}
POINT = ([[500, 375]], [1])  # the window of truck.jpg


def peak_rss_mb() -> float:
    """This process's peak resident memory.

    On Linux from VmHWM: getrusage's ru_maxrss survives fork + exec, so a worker would
    report at least the driver's own peak (the driver holds the random checkpoints).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 2**20 if sys.platform == "darwin" else usage / 1024.0  # bytes on macOS, KiB elsewhere


def timed(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------ workers (one per subprocess)
def measure(predictor, image, runs: int, time_encoding: bool = True) -> dict:
    """Peak memory, encoding times (after a warm-up) and prompt-to-mask times of one predictor."""
    import numpy as np

    result = {"load_rss_mb": peak_rss_mb()}
    predictor.set_image(image)  # warm-up
    if time_encoding:
        result["encode_s"] = timed(lambda: predictor.set_image(image), runs)
    result["peak_rss_mb"] = peak_rss_mb()
    coords, labels = np.array(POINT[0]), np.array(POINT[1])
    predictor.predict(coords, labels)
    result["prompt_s"] = timed(lambda: predictor.predict(coords, labels), 20)
    result["prompt_single_s"] = timed(lambda: predictor.predict(coords, labels, multimask_output=False), 20)
    return result


def time_everything(generator, image, result: dict) -> None:
    start = time.perf_counter()
    result["everything_masks"] = len(generator.generate(image))
    result["everything_s"] = [time.perf_counter() - start]


def worker_mlx(model_name: str, checkpoint: str, image_path: str, runs: int, everything: bool) -> dict:
    import numpy as np
    import sam_mlx
    from sam_mlx.image_io import load_image

    image = load_image(image_path)
    predictor = sam_mlx.SamPredictor(sam_mlx.load(checkpoint))
    result = measure(predictor, image, runs)
    # interactive trade-off (sam_mlx only): a 512 stretch encoding, 4x fewer tokens for the decoder
    stretch = sam_mlx.SamPredictor(predictor.model, sizing="stretch", size=512)
    stretch.set_image(image)
    coords, labels = np.array(POINT[0]), np.array(POINT[1])
    stretch.predict(coords, labels)
    result["prompt_stretch512_s"] = timed(lambda: stretch.predict(coords, labels), 20)
    if everything:
        from sam_mlx.automatic_mask_generator import SamAutomaticMaskGenerator

        time_everything(SamAutomaticMaskGenerator(predictor.model), image, result)
    return result


def worker_torch(model_name: str, checkpoint: str, image_path: str, runs: int, everything: bool) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from PIL import Image
    from reference import build_reference_sam, reference_generator_class, reference_predictor_class

    image = np.asarray(Image.open(image_path).convert("RGB"))
    if model_name == "mobile_sam":
        sam = _torch_mobile_sam_decoder(checkpoint, image)
    else:
        sam = build_reference_sam(**RANDOM_MODELS[model_name])
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    with torch.no_grad():
        # MobileSAM: no TinyViT in PyTorch here, its stand-in encoder is not timed.
        result = measure(reference_predictor_class()(sam), image, runs, time_encoding=model_name != "mobile_sam")
        if everything:
            time_everything(reference_generator_class()(sam), image, result)
    return result


def _torch_mobile_sam_decoder(checkpoint: str, image) -> "torch.nn.Module":
    """Meta's Sam with MobileSAM's real prompt encoder/decoder; its encoder returns sam_mlx's embedding."""
    import numpy as np
    import torch

    from reference import build_reference_sam

    import sam_mlx

    ours = sam_mlx.SamPredictor(sam_mlx.load(checkpoint))
    ours.set_image(image)
    embedding = torch.from_numpy(np.ascontiguousarray(ours.get_image_embedding()))

    class FixedEmbedding(torch.nn.Module):
        img_size = 1024

        def forward(self, x):
            return embedding.expand(x.shape[0], -1, -1, -1)

    sam = build_reference_sam(embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,))
    sam.image_encoder = FixedEmbedding()
    state = torch.load(checkpoint, map_location="cpu")
    sam.load_state_dict({k: v for k, v in state.items() if not k.startswith("image_encoder.")}, strict=False)
    return sam.eval()


# ------------------------------------------------------------------ driver
def run_worker(framework: str, model: str, checkpoint: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--model", model, "--checkpoint", checkpoint,
           "--image", str(args.image), "--runs", str(args.runs)]
    if args.everything and model == "mobile_sam":
        cmd.append("--worker-everything")
    print(f"  {framework:5s} {model} ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{framework} worker for {model} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_checkpoints(models: list[str], folder: Path) -> dict[str, str]:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import build_reference_sam

    paths = {}
    for name in models:
        if name == "mobile_sam":
            paths[name] = str(SHARED / "weights" / "mobile_sam.pt")
        else:
            paths[name] = str(folder / f"{name}_random.pth")
            torch.save(build_reference_sam(**RANDOM_MODELS[name], seed=0).state_dict(), paths[name])
    return paths


def machine() -> dict:
    import sam_mlx._blas as blas  # before mlx: loads OpenBLAS as sam_mlx does

    blas.load_system_blas()
    import mlx.core as mx
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_device": str(mx.default_device()),
        "blas": blas.blas_description(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def summarise(results: dict) -> list[dict]:
    rows = []
    for model, pair in results.items():
        for key, label, unit in [
            ("encode_s", "image encoding 1024", "s"),
            ("prompt_s", "prompt -> masks at original size", "ms"),
            ("prompt_single_s", "prompt -> 1 mask (multimask_output=False)", "ms"),
            ("prompt_stretch512_s", "prompt -> masks, stretch 512 encoding", "ms"),
            ("everything_s", "segment everything", "s"),
            ("peak_rss_mb", "peak RSS (load + encode)", "MB"),
        ]:
            values = {}
            for fw in ("mlx", "torch"):
                v = pair.get(fw, {}).get(key)
                if v is None:
                    values[fw] = None
                elif isinstance(v, list):
                    values[fw] = statistics.median(v) * (1000 if unit == "ms" else 1)
                else:
                    values[fw] = v
            if values["mlx"] is None and values["torch"] is None:
                continue
            ratio = values["mlx"] / values["torch"] if values["mlx"] and values["torch"] else None
            rows.append({"model": model, "row": label, "unit": unit, "sam_mlx": values["mlx"],
                         "pytorch": values["torch"], "ratio": ratio})
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(v, unit):
        return "n/a" if v is None else (f"{v:.1f}" if unit in ("ms", "MB") else f"{v:.2f}")

    print("| model | measurement | sam_mlx | PyTorch | sam_mlx / PyTorch |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"| {r['model']} | {r['row']} ({r['unit']}) | {fmt(r['sam_mlx'], r['unit'])} | "
              f"{fmt(r['pytorch'], r['unit'])} | {ratio} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_b,vit_l,mobile_sam")
    parser.add_argument("--image", type=Path, default=SHARED / "images" / "truck.jpg")
    parser.add_argument("--runs", type=int, default=3, help="timed encodings after one warm-up")
    parser.add_argument("--no-everything", dest="everything", action="store_false")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", choices=["mlx", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--worker-everything", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        fn = worker_mlx if args.worker == "mlx" else worker_torch
        print(json.dumps(fn(args.model, args.checkpoint, str(args.image), args.runs, args.worker_everything)))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = make_checkpoints(models, Path(tmp))
        for model in models:
            print(f"{model}:", file=sys.stderr)
            results[model] = {fw: run_worker(fw, model, checkpoints[model], args) for fw in ("mlx", "torch")}
    rows = summarise(results)
    info = machine()
    print(f"\nMachine: {info['processor']}, {info['cpus']} CPUs, {info['platform']}; MLX {info['mlx']} "
          f"on {info['mlx_device']} with {info['blas']}; PyTorch {info['torch']} ({info['torch_threads']} threads); "
          f"image {args.image.name}\n")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "raw": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
