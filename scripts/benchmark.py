#!/usr/bin/env python
"""Time sam_mlx against the original PyTorch SAM in one run, on the same weights and photo.

Rows, per model (random ViT-B, random ViT-L, the shared MobileSAM):
  encode      image encoding at 1024 (set_image), median of --runs after a warm-up
  prompt      one point -> 3 masks at the original size (decoder + post-processing), and -> 1 mask
              (multimask_output=False); median of 36 (3 rounds of 12, see below). sam_mlx also
              without low-res logits (return_low_res=False: the original's predict, which always
              returns them, is its reference), and at a 512 stretch encoding (sam_mlx alone, median of 20)
  everything  automatic mask generation on the photo, default settings (MobileSAM only: random
              weights give meaningless mask sets), one run after a warm-up decode
  peak RSS    the process's peak resident memory after loading and encoding

Each (framework, model) pair runs in its own fresh subprocess so peak memory is its own.
sam_mlx converts each checkpoint once, beforehand, into a model cache inside the run's temporary
folder (deleted with it), so its workers load the converted file as a user's second run would.
Meta's segment-anything has no TinyViT, so MobileSAM's encoding is timed for sam_mlx only.
Prompts are timed in further subprocesses that decode sam_mlx's saved embedding of the photo
(PyTorch: Meta's prompt encoder and mask decoder with the same weights), sam_mlx's and
PyTorch's alternating for 3 rounds, so the slow spells of a shared machine fall on both alike.

    python scripts/benchmark.py --models vit_b,mobile_sam --runs 3 --json bench.json
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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
    """Peak memory and encoding times (after a warm-up) of one predictor."""
    result = {"load_rss_mb": peak_rss_mb()}
    predictor.set_image(image)  # warm-up
    if time_encoding:
        result["encode_s"] = timed(lambda: predictor.set_image(image), runs)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def time_everything(generator, image, result: dict) -> None:
    start = time.perf_counter()
    result["everything_masks"] = len(generator.generate(image))
    result["everything_s"] = [time.perf_counter() - start]


def worker_convert(args) -> dict:
    """Convert the checkpoint into the run's model cache (SAM_MLX_CACHE), once, before the timed workers."""
    import sam_mlx

    sam_mlx.load(args.checkpoint)
    return {}


def worker_mlx(args) -> dict:
    """Encoding and memory; saves the photo's embedding for the prompt workers; times prompts at stretch 512."""
    import numpy as np

    import sam_mlx
    from sam_mlx.io.images import load_image

    image = load_image(args.image)
    predictor = sam_mlx.SamPredictor(sam_mlx.load(args.checkpoint))
    result = measure(predictor, image, args.runs)
    np.save(args.embedding, predictor.get_image_embedding())
    # the interactive trade-off (sam_mlx only, so not interleaved): a 512 stretch encoding, 21 x 32 tokens here
    stretch = sam_mlx.SamPredictor(predictor.model, sizing="stretch", size=512)
    stretch.set_image(image)
    coords, labels = np.array(POINT[0]), np.array(POINT[1])
    stretch.predict(coords, labels)
    result["prompt_stretch512_s"] = timed(lambda: stretch.predict(coords, labels), 20)
    if args.worker_everything:
        time_everything(sam_mlx.SamAutomaticMaskGenerator(predictor.model), image, result)
    return result


def worker_torch(args) -> dict:
    """Encoding and memory (MobileSAM: no TinyViT in PyTorch, its stand-in encoder is not timed)."""
    import torch

    from reference import reference_generator_class, reference_predictor_class

    image = _rgb(args.image)
    sam = _torch_sam(args)
    with torch.no_grad():
        result = measure(reference_predictor_class()(sam), image, args.runs, time_encoding=args.model != "mobile_sam")
        if args.worker_everything:
            time_everything(reference_generator_class()(sam), image, result)
    if args.model == "mobile_sam":  # a decoder alone: its memory is not comparable
        del result["load_rss_mb"], result["peak_rss_mb"]
    return result


def worker_prompts(args) -> dict:
    """One point -> 3 masks, -> 1 mask, and -> 1 mask with the best of the 3 as mask hint (sam_mlx also -> 3
    masks without low-res logits), decoded from the saved embedding of the photo, 12 calls each."""
    import numpy as np

    image = _rgb(args.image)
    coords, labels = np.array(POINT[0]), np.array(POINT[1])
    if args.worker == "prompts-mlx":
        import sam_mlx  # first: it loads OpenBLAS before mlx

        # isort: split
        import mlx.core as mx

        from sam_mlx.transforms import image_geometry

        predictor = sam_mlx.SamPredictor(sam_mlx.load(args.checkpoint))
        tokens = mx.array(np.load(args.embedding).transpose(0, 2, 3, 1))
        predictor.set_image_tokens(tokens, image_geometry(image.shape[:2]))
        no_grad = contextlib.nullcontext()
        options = {"prompt_s": {}, "prompt_single_s": {"multimask_output": False},
                   "prompt_masks_only_s": {"return_low_res": False}}
    else:
        import torch

        from reference import reference_predictor_class

        predictor = reference_predictor_class()(_torch_sam(args, decoder_only=True))
        predictor.set_image(image)
        no_grad = torch.no_grad()
        options = {"prompt_s": {}, "prompt_single_s": {"multimask_output": False}}
    result: dict[str, list[float]] = {}
    with no_grad:
        _, scores, low_res = predictor.predict(coords, labels)
        # the refinement step: the best mask's low-res logits fed back with the same point
        options["prompt_hint_s"] = {"mask_input": low_res[[np.argmax(scores)]], "multimask_output": False}
        for key, kwargs in options.items():
            predictor.predict(coords, labels, **kwargs)  # warm-up
            result[key] = timed(lambda kwargs=kwargs: predictor.predict(coords, labels, **kwargs), 12)
    return result


def _rgb(path: Path):
    """The photo as H x W x 3 RGB, turned as its EXIF tag says (as sam_mlx's loader, without importing mlx)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _torch_sam(args, decoder_only: bool = False) -> torch.nn.Module:
    """Meta's Sam with the checkpoint's weights. With ``decoder_only`` (always for MobileSAM) only its prompt
    encoder and mask decoder are loaded, and its image encoder returns sam_mlx's saved embedding."""
    import numpy as np
    import torch

    from reference import build_reference_sam

    state = torch.load(args.checkpoint, map_location="cpu")
    if not decoder_only and args.model != "mobile_sam":
        sam = build_reference_sam(**RANDOM_MODELS[args.model])
        sam.load_state_dict(state)
        return sam.eval()
    embedding = torch.from_numpy(np.load(args.embedding))

    class SavedEmbedding(torch.nn.Module):
        img_size = 1024

        def forward(self, x):
            return embedding.expand(x.shape[0], -1, -1, -1)

    sam = build_reference_sam(embed_dim=32, depth=1, num_heads=1, global_attn_indexes=(0,))
    sam.image_encoder = SavedEmbedding()
    sam.load_state_dict({k: v for k, v in state.items() if not k.startswith("image_encoder.")}, strict=False)
    return sam.eval()


# ------------------------------------------------------------------ driver
WORKERS = {"convert": worker_convert, "mlx": worker_mlx, "torch": worker_torch,
           "prompts-mlx": worker_prompts, "prompts-torch": worker_prompts}
PROMPT_ROUNDS = 3  # the prompt workers of the two frameworks alternate, so slow spells fall on both


def run_worker(worker: str, model: str, checkpoint: str, embedding: Path, args) -> dict:
    """One worker subprocess; its converted models go to a cache in the run's temporary folder."""
    cmd = [sys.executable, __file__, "--worker", worker, "--model", model, "--checkpoint", checkpoint,
           "--image", str(args.image), "--runs", str(args.runs), "--embedding", str(embedding)]
    if args.everything and model == "mobile_sam" and worker in ("mlx", "torch"):
        cmd.append("--worker-everything")
    print(f"  {worker:13s} {model} ...", file=sys.stderr, flush=True)
    env = {**os.environ, "SAM_MLX_CACHE": str(embedding.parent / "model_cache")}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise SystemExit(f"{worker} worker for {model} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_model(model: str, checkpoint: str, folder: Path, args) -> dict:
    """All workers of one model: encoding and memory per framework, then alternating prompt rounds."""
    embedding = folder / f"{model}_embedding.npy"
    run_worker("convert", model, checkpoint, embedding, args)
    result = {"mlx": run_worker("mlx", model, checkpoint, embedding, args), "torch": {}}
    if model != "mobile_sam" or args.everything:  # PyTorch has no TinyViT: nothing else to measure
        result["torch"] = run_worker("torch", model, checkpoint, embedding, args)
    for _ in range(PROMPT_ROUNDS):
        for fw in ("mlx", "torch"):
            for key, times in run_worker(f"prompts-{fw}", model, checkpoint, embedding, args).items():
                result[fw].setdefault(key, []).extend(times)
    return result


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
    import sam_mlx.ops.blas as blas  # before mlx: loads OpenBLAS as sam_mlx does

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
        for key, label, unit, torch_key in [
            ("encode_s", "image encoding 1024", "s", None),
            ("prompt_s", "prompt -> masks at original size", "ms", None),
            ("prompt_masks_only_s", "prompt -> masks, no low-res logits (return_low_res=False)", "ms", "prompt_s"),
            ("prompt_single_s", "prompt -> 1 mask (multimask_output=False)", "ms", None),
            ("prompt_hint_s", "prompt + mask hint -> 1 mask (refinement)", "ms", None),
            ("prompt_stretch512_s", "prompt -> masks, stretch 512 encoding", "ms", None),
            ("everything_s", "segment everything", "s", None),
            ("peak_rss_mb", "peak RSS (load + encode)", "MB", None),
        ]:
            values = {}
            for fw in ("mlx", "torch"):
                v = pair.get(fw, {}).get(torch_key if fw == "torch" and torch_key else key)
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
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--embedding", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--worker-everything", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        sys.path.insert(0, str(ROOT / "tests"))
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = make_checkpoints(models, Path(tmp))
        for model in models:
            print(f"{model}:", file=sys.stderr)
            results[model] = run_model(model, checkpoints[model], Path(tmp), args)
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
