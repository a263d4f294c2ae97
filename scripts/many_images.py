"""Images per minute over a folder: the plain command against the same command on Ray workers, in one run.

    python scripts/many_images.py [--images 21] [--rounds 1] [--points-per-side 8] [--json]

Makes a folder of flipped and cropped copies of the shared photos, converts MobileSAM to sam_mlx safetensors
once, starts one local Ray instance (2 CPUs, as this machine has; its start-up is timed once, apart), then for
``encode`` and ``everything`` (``--points-per-side`` points a side) runs, alternating their order each round:

- ``plain``: ``sam-mlx CMD DIR`` as a fresh process (one model load; row bands and OpenBLAS threads: the cores);
- ``ray 2x1``: ``--ray`` with 2 workers of 1 CPU each (1 row band, 1 OpenBLAS thread each: the default);
- ``ray 1x2``: 1 worker of 2 CPUs (2 bands, 2 threads);
- ``ray 2x2``: 2 workers with 2 bands and 2 threads each (``--worker-threads 2``: the cores oversubscribed).

A Ray run's wall time counts its workers' start-up and model loads (a new actor pool per command), not the
Ray instance's. ``per image`` is the median of the images' own seconds as the workers timed them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SAM_MLX_SHARED", ROOT.parent / "shared"))
PHOTOS = ("dog.jpg", "groceries.jpg", "truck.jpg")
VARIANTS = {
    "plain": None,
    "ray 2x1": ["--workers", "2"],
    "ray 1x2": ["--workers", "1", "--worker-cpus", "2"],
    "ray 2x2": ["--workers", "2", "--worker-threads", "2"],
}


def make_images(folder: Path, count: int) -> None:
    """``count`` images: the shared photos, mirrored, flipped, turned and cropped in turn."""
    edits = [
        lambda im: im,
        lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        lambda im: im.transpose(Image.Transpose.ROTATE_180),
        lambda im: im.crop((im.width // 10, im.height // 10, im.width * 9 // 10, im.height * 9 // 10)),
        lambda im: im.crop((0, 0, im.width * 2 // 3, im.height)),
        lambda im: im.crop((im.width // 3, 0, im.width, im.height)),
    ]
    folder.mkdir(parents=True)
    for i in range(count):
        photo = PHOTOS[i % len(PHOTOS)]
        image = edits[(i // len(PHOTOS)) % len(edits)](Image.open(SHARED / "images" / photo).convert("RGB"))
        image.save(folder / f"{i:03d}_{Path(photo).stem}.jpg", quality=92)


def command_args(command: str, folder: Path, model: Path, points: int) -> list[str]:
    extra = ["--points-per-side", str(points)] if command == "everything" else []
    return [command, str(folder), "--model", str(model), *extra, "--json"]


def run_plain(args: list[str], out: Path) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "sam_mlx.cli", *args, "--out-dir", str(out)],
                            capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise RuntimeError(f"sam-mlx {' '.join(args)} failed: {result.stderr[-2000:]}")
    return seconds, [json.loads(line) for line in result.stdout.splitlines()]


def run_on_ray(args: list[str], out: Path, options: list[str]) -> tuple[float, list[dict]]:
    from sam_mlx import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([*args, "--out-dir", str(out), "--ray", *options])
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"sam-mlx {' '.join(args)} --ray failed: {stderr.getvalue()[-2000:]}")
    return seconds, [json.loads(line) for line in stdout.getvalue().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--points-per-side", type=int, default=8)
    parser.add_argument("--commands", default="encode,everything")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = parser.parse_args()

    import ray

    import sam_mlx
    from sam_mlx.checkpoints.load import load_checkpoint, save_model

    work = Path(tempfile.mkdtemp(prefix="many_images_"))
    folder = work / "images"
    make_images(folder, args.images)
    model = save_model(load_checkpoint(SHARED / "weights" / "mobile_sam.pt"), work / "mobile_sam.safetensors")
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - start
    variants = args.variants.split(",")
    results: list[dict] = []
    for round_ in range(args.rounds):
        for c, command in enumerate(args.commands.split(",")):
            order = variants if (round_ + c) % 2 == 0 else variants[::-1]  # each variant first and last in turn
            for variant in order:
                out = work / f"out_{round_}_{command}_{variant.replace(' ', '_')}"
                cli_args = command_args(command, folder, model, args.points_per_side)
                seconds, lines = (run_plain(cli_args, out) if VARIANTS[variant] is None
                                  else run_on_ray(cli_args, out, VARIANTS[variant]))
                per_image = statistics.median(line["seconds"]["total"] for line in lines if "seconds" in line)
                results.append({"round": round_, "command": command, "variant": variant, "images": args.images,
                                "seconds": round(seconds, 2), "images_per_minute": round(60 * args.images / seconds, 1),
                                "seconds_per_image": round(per_image, 3)})
                print(f"{command} {variant}: {seconds:.1f} s, {results[-1]['images_per_minute']} images/min, "
                      f"{per_image:.2f} s per image", file=sys.stderr, flush=True)
    ray.shutdown()
    summary = {"date": time.strftime("%Y-%m-%d"), "images": args.images, "points_per_side": args.points_per_side,
               "rounds": args.rounds, "ray_start_seconds": round(ray_start, 1), "sam_mlx": sam_mlx.__version__,
               "ray": ray.__version__, "results": results}
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{args.images} images, MobileSAM, original sizing, everything at {args.points_per_side}x"
          f"{args.points_per_side} points; Ray instance start-up {ray_start:.1f} s (not in the Ray runs)\n")
    print("| command | run | wall time (s) | images / minute | vs plain | seconds per image (median, in the worker) |")
    print("|---|---|---|---|---|---|")
    for command in args.commands.split(","):
        for variant in variants:
            rows = [r for r in results if r["command"] == command and r["variant"] == variant]
            plain = [r for r in results if r["command"] == command and r["variant"] == "plain"]
            seconds = statistics.median(r["seconds"] for r in rows)
            ratio = f"{statistics.median(r['seconds'] for r in plain) / seconds:.2f}x" if plain else "n/a"
            print(f"| {command} | {variant} | {seconds:.1f} | {60 * args.images / seconds:.1f} | {ratio} | "
                  f"{statistics.median(r['seconds_per_image'] for r in rows):.2f} |")


if __name__ == "__main__":
    main()
