#!/usr/bin/env python
"""What sam_mlx does on this machine's MLX device, measured against MLX's CPU in float32, in one command.

    python scripts/device_check.py --out report.json               # ~6 minutes at most
    python scripts/device_check.py --out report.json --checkpoint mobile_sam.pt --photos photos/

Needs only sam_mlx and its dependencies (no torch). On a Mac it measures the Apple GPU; on Linux with
``mlx[cuda]`` an NVIDIA GPU; without a GPU, MLX's CPU against itself (how the check's own test runs it). The
report is written (atomically) after every step, so a run cut short keeps what it measured:

- ``environment``: versions, the device and what MLX reports about it, the precisions sam_mlx picks there;
- ``precision``: random-weight encoders shaped like ViT-B (head dim 64) and ViT-H (head dim 80), with the real
  geometry, in float32 / bfloat16 / float16 on the device against float32 on the CPU: the image tokens' largest
  difference (relative to their largest value), the scores' and the masks' agreement for three point prompts
  (within half the budget: on a slow CPU the larger shapes and precisions are skipped);
- ``tf32``: the ViT-B-shaped float32 comparison again in subprocesses with ``MLX_ENABLE_TF32=0`` and ``=1``
  (MLX may multiply float32 in reduced precision on CUDA and the newest Macs unless told not to);
- ``mobile_sam``: the real MobileSAM (``--checkpoint``) at the device's default precision against the CPU on each
  photo of ``--photos``;
- ``timings``: encoding per model and precision, a prompt with 3 masks, with 1 mask, with a mask hint, a batch of
  16 prompts, segment everything on a 32 x 32 grid (seconds, the median of a few runs after a first one);
- ``memory``: MLX's peak memory while encoding against sam_mlx's estimate (``resources.encoding_memory``);
- ``threads``: encoding in a worker thread while the main thread decodes, and many short-lived threads, each
  result equal to the single-threaded one.

Steps past ``--budget`` seconds are recorded as skipped. ``--quick`` shrinks every shape (two blocks, 256-pixel
images, an 8 x 8 grid) for the check's own test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sam_mlx  # noqa: E402  (before mlx: OpenBLAS on Linux)

# isort: split
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_map_with_path  # noqa: E402

from sam_mlx import resources  # noqa: E402
from sam_mlx.checkpoints.load import DTYPES, default_encoder_dtype  # noqa: E402
from sam_mlx.config import SamConfig, ViTConfig  # noqa: E402
from sam_mlx.io.atomic import atomic_write  # noqa: E402
from sam_mlx.io.images import as_rgb_array  # noqa: E402
from sam_mlx.modeling.sam import Sam  # noqa: E402

# (name, ViT config, sizing) for full runs and --quick
SHAPES = {
    "vit_b_shaped": (ViTConfig(), dict(embed_dim=128, depth=2, num_heads=2, mlp_dim=512, global_attention_blocks=(1,))),
    "vit_h_shaped": (ViTConfig(embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120,
                               global_attention_blocks=(7, 15, 23, 31)),
                     dict(embed_dim=160, depth=2, num_heads=2, mlp_dim=640, global_attention_blocks=(1,))),
}
POINTS = ((0.5, 0.5), (0.3, 0.6), (0.7, 0.35))  # prompts as fractions of the image's width and height


class Report:
    """The JSON report, written after every step; steps beyond the time budget are skipped."""

    def __init__(self, path: Path, budget: float):
        self.path, self.deadline, self.data = path, time.monotonic() + budget, {}

    def step(self, name: str, run: Callable[[], Any]) -> None:
        if time.monotonic() > self.deadline:
            self.data[name] = {"skipped": "past the time budget (--budget)"}
        else:
            started = time.monotonic()
            try:
                self.data[name] = run()
            except Exception as exc:  # a failed step is a finding: record it, go on with the others
                self.data[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        text = json.dumps(self.data, indent=2, default=str)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def left(self) -> float:
        return self.deadline - time.monotonic()


def device() -> mx.Device:
    """The device sam_mlx computes on here: the GPU when MLX has one."""
    return mx.gpu if mx.is_available(mx.gpu) else mx.cpu


@contextmanager
def on(target: mx.Device) -> Iterator[None]:
    """MLX's default device inside the block (sam_mlx's kernels follow it: ``ops.backend.on_cpu``)."""
    before = mx.default_device()
    mx.set_default_device(target)
    try:
        yield
    finally:
        mx.set_default_device(before)


def random_vit(config: ViTConfig, seed: int = 0) -> dict[str, mx.array]:
    """Float32 weights for a SAM with this ViT: MLX's own initialisation, with the relative-position tables and
    the position encoding (zeros at initialisation) drawn small, so every term of the attention counts."""
    mx.random.seed(seed)
    model = Sam(SamConfig(encoder=config))

    def draw(path: str, value: mx.array) -> mx.array:
        return 0.02 * mx.random.normal(value.shape) if path.endswith(("rel_pos_h", "rel_pos_w", "embedding")) else value

    weights = dict(tree_flatten(tree_map_with_path(draw, model.parameters())))
    mx.eval(weights)
    return weights


def build(config: ViTConfig, weights: dict[str, mx.array], dtype: mx.Dtype) -> Sam:
    """The model with its image encoder in ``dtype`` (the rest float32), as sam_mlx loads one."""
    model = Sam(SamConfig(encoder=config))
    model.load_weights([(k, v.astype(dtype) if k.startswith("image_encoder.") else v) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model


def test_image(size: int) -> np.ndarray:
    """A smooth synthetic photo (gradients and discs), size x size x 3 uint8, the same on every run."""
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([x, y, 1 - x * y], axis=-1) * 200
    for cx, cy, r in ((0.3, 0.6, 0.15), (0.7, 0.35, 0.2), (0.5, 0.5, 0.08)):
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = (240, 60, 30)
    return image.astype(np.uint8)


def outputs(model: Sam, image: np.ndarray, sizing: tuple[str, int]) -> dict[str, np.ndarray]:
    """Tokens, then for each of ``POINTS`` the 3 masks and scores."""
    predictor = sam_mlx.SamPredictor(model, sizing=sizing[0], size=sizing[1])
    predictor.set_image(image)
    h, w = image.shape[:2]
    out = {"tokens": predictor.get_image_embedding()}
    for i, (fx, fy) in enumerate(POINTS):
        masks, scores, _ = predictor.predict(point_coords=np.array([[fx * w, fy * h]]), point_labels=np.array([1]))
        out[f"masks{i}"], out[f"scores{i}"] = masks, scores
    return out


def agreement(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest token difference (absolute and relative to the largest token), largest score difference, the
    smallest IoU of a prompt's best mask (by the reference's score) and the share of equal mask pixels."""
    tokens = np.abs(other["tokens"].astype(np.float32) - reference["tokens"])
    ious, equal, scores = [], [], []
    for i in range(len(POINTS)):
        best = int(np.argmax(reference[f"scores{i}"]))
        a, b = reference[f"masks{i}"][best], other[f"masks{i}"][best]
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
        equal.append(float((reference[f"masks{i}"] == other[f"masks{i}"]).mean()))
        scores.append(float(np.abs(reference[f"scores{i}"] - other[f"scores{i}"]).max()))
    finite = bool(np.isfinite(other["tokens"]).all())
    return {"tokens_max_diff": float(tokens.max()),
            "tokens_max_rel": float(tokens.max() / np.abs(reference["tokens"]).max()),
            "scores_max_diff": max(scores), "best_mask_iou_min": min(ious), "mask_pixels_equal_min": min(equal),
            "finite": finite}


def environment() -> dict[str, Any]:
    info = {k: (str(v) if not isinstance(v, (int, float, str)) else v) for k, v in mx.device_info().items()}
    with on(device()):
        on_device = {name: str(default_encoder_dtype(SamConfig(encoder=enc)))
                     for name, enc in (("vit", ViTConfig()), ("tiny_vit", sam_mlx.TinyViTConfig()))}
    return {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine(),
            "mlx": mx.__version__, "numpy": np.__version__, "sam_mlx": sam_mlx.__version__,
            "device": "gpu" if device() == mx.gpu else "cpu", "gpu_available": mx.is_available(mx.gpu),
            "device_info": info,
            "default_encoder_dtypes": on_device, "MLX_ENABLE_TF32": os.environ.get("MLX_ENABLE_TF32"),
            "recommended_working_set": resources.gpu_working_set() if device() == mx.gpu else None,
            "machine_memory": resources.machine_memory()}


def precision(shapes: dict, sizing: tuple[str, int], dtypes: list[str], seconds: float) -> dict[str, Any]:
    """Each shape in each precision on the device against float32 on the CPU, within ``seconds``. A shape is
    skipped when its CPU reference would not fit (estimated from the last one's time by width^2 x depth), a
    precision when under 4x the reference's time is left (20x for half precision on a CPU: measured ~14x slower
    than float32 there)."""
    stop = time.monotonic() + seconds
    image = test_image(sizing[1])
    results: dict[str, Any] = {}
    last: tuple[ViTConfig, float] | None = None
    for name, config in shapes.items():
        if last is not None:
            previous, previous_seconds = last
            scale = (config.embed_dim**2 * config.depth) / (previous.embed_dim**2 * previous.depth)
            if stop - time.monotonic() < 2 * scale * previous_seconds:
                results[name] = {"skipped": "would run past the time budget (--budget)"}
                continue
        weights = random_vit(config)
        started = time.monotonic()
        with on(mx.cpu):
            reference = outputs(build(config, weights, mx.float32), image, sizing)
        last = (config, time.monotonic() - started)
        results[name] = {"cpu_float32_seconds": last[1]}
        for dtype in dtypes:
            slower = 20 if device() == mx.cpu and dtype != "float32" else 4
            if stop - time.monotonic() < slower * last[1]:
                results[name][dtype] = {"skipped": "would run past the time budget (--budget)"}
                continue
            with on(device()):
                results[name][dtype] = agreement(reference, outputs(build(config, weights, DTYPES[dtype]), image,
                                                                    sizing))
    return results


def tf32(quick: bool, seconds: float) -> dict[str, Any]:
    """The float32 ViT-B-shaped comparison in a subprocess per MLX_ENABLE_TF32 setting, each within half of
    ``seconds``."""
    results: dict[str, Any] = {}
    for setting in ("0", "1"):
        command = [sys.executable, __file__, "--only-tf32-probe"] + (["--quick"] if quick else [])
        try:
            run = subprocess.run(command, env=dict(os.environ, MLX_ENABLE_TF32=setting), capture_output=True,
                                 text=True, timeout=max(seconds / 2, 1))
        except subprocess.TimeoutExpired:
            results[f"MLX_ENABLE_TF32={setting}"] = {"skipped": "would run past the time budget (--budget)"}
            continue
        results[f"MLX_ENABLE_TF32={setting}"] = (json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0
                                                 else {"error": run.stderr[-500:]})
    return results


def tf32_probe(quick: bool) -> None:
    config = ViTConfig(**SHAPES["vit_b_shaped"][1]) if quick else SHAPES["vit_b_shaped"][0]
    sizing = ("stretch", 256) if quick else ("original", 1024)
    weights, image = random_vit(config), test_image(sizing[1])
    with on(mx.cpu):
        reference = outputs(build(config, weights, mx.float32), image, sizing)
    with on(device()):
        print(json.dumps(agreement(reference, outputs(build(config, weights, mx.float32), image, sizing))))


def photos_of(folder: Path | None) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if folder else []


def mobile_sam(checkpoint: Path, photos: list[Path], size: int) -> dict[str, Any]:
    """The real MobileSAM at the device's default precision against float32 on the CPU, per photo."""
    with on(mx.cpu):
        reference_model = sam_mlx.load(str(checkpoint))
    with on(device()):
        model = sam_mlx.load(str(checkpoint))
    results = {"device_encoder_dtype": str(model.encoder_dtype)}
    for photo in photos:
        image = np.array(as_rgb_array(str(photo)))
        with on(mx.cpu):
            reference = outputs(reference_model, image, ("original", size))
        with on(device()):
            results[photo.name] = agreement(reference, outputs(model, image, ("original", size)))
    return results


def median_time(run: Callable[[], Any], repeats: int) -> float:
    run()  # the first run compiles and allocates
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timings(models: dict[str, Callable[[], Sam]], image: np.ndarray, sizing: tuple[str, int], grid: int,
            repeats: int, report: Report) -> dict[str, Any]:
    """Seconds per encoding and per prompt kind on the device, for each (model, precision); a minute of the
    budget is left for the steps after."""
    results: dict[str, Any] = {}
    with on(device()):
        for name, make in models.items():
            if report.left() < 60:
                results[name] = {"skipped": "past the time budget (--budget)"}
            else:
                results[name] = time_model(make(), image, sizing, grid, repeats, report)
    return results


def time_model(model: Sam, image: np.ndarray, sizing: tuple[str, int], grid: int, repeats: int,
               report: Report) -> dict[str, Any]:
    h, w = image.shape[:2]
    point = dict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))
    predictor = sam_mlx.SamPredictor(model, sizing=sizing[0], size=sizing[1])
    entry: dict[str, Any] = {"encode": median_time(lambda: predictor.set_image(image), repeats)}
    entry["prompt_3_masks"] = median_time(lambda: predictor.predict(**point), repeats)
    entry["prompt_1_mask"] = median_time(lambda: predictor.predict(**point, multimask_output=False), repeats)
    hint = predictor.predict(**point, multimask_output=False)[2]
    entry["prompt_with_hint"] = median_time(lambda: predictor.predict(**point, mask_input=hint), repeats)
    batch = np.stack([np.array([[w * (i + 1) / 17, h / 2]]) for i in range(16)])
    entry["batch_of_16"] = median_time(lambda: predictor.predict_batch(batch, np.ones((16, 1))), repeats)
    if report.left() < 60:
        entry[f"everything_{grid}x{grid}"] = {"skipped": "past the time budget (--budget)"}
        return entry
    generator = sam_mlx.SamAutomaticMaskGenerator(model, points_per_side=grid, sizing=sizing[0], size=sizing[1])
    started = time.perf_counter()
    entry[f"everything_{grid}x{grid}"] = {"masks": len(generator.generate(image)),
                                          "seconds": time.perf_counter() - started}
    return entry


def memory(models: dict[str, Callable[[], Sam]], image: np.ndarray, sizing: tuple[str, int]) -> dict[str, Any]:
    """MLX's peak memory over one encoding (beyond the weights) against sam_mlx's estimate for it."""
    results = {}
    with on(device()):
        for name, make in models.items():
            model = make()
            predictor = sam_mlx.SamPredictor(model, sizing=sizing[0], size=sizing[1])
            predictor.set_image(image)  # once first: compiled kernels, buffers
            predictor.reset_image()
            mx.clear_cache()
            mx.reset_peak_memory()
            before = mx.get_active_memory()
            predictor.set_image(image)
            geometry = sam_mlx.transforms.image_geometry(image.shape[:2], *sizing)
            results[name] = {"peak_bytes": mx.get_peak_memory() - before,
                             "estimate_bytes": resources.encoding_memory(model.config, geometry.padded_size,
                                                                         cpu=device() == mx.cpu),
                             "weights_bytes": sum(v.nbytes for _, v in tree_flatten(model.parameters()))}
    return results


def threads(make: Callable[[], Sam], image: np.ndarray, sizing: tuple[str, int], count: int) -> dict[str, Any]:
    """An encoding in a worker thread while the main thread decodes on another predictor, then ``count``
    short-lived threads each encoding and decoding: every result equal to the single-threaded one."""
    h, w = image.shape[:2]
    point = dict(point_coords=np.array([[w / 2, h / 2]]), point_labels=np.array([1]))
    with on(device()):
        model = make()
        alone = sam_mlx.SamPredictor(model, sizing=sizing[0], size=sizing[1])
        alone.set_image(image)
        expected_tokens, expected_scores = alone.get_image_embedding(), alone.predict(**point)[1]
        worker_predictor = sam_mlx.SamPredictor(model, sizing=sizing[0], size=sizing[1])
        found: dict[str, Any] = {}

        def encode() -> None:
            worker_predictor.set_image(image)
            found["tokens"] = worker_predictor.get_image_embedding()

        worker = threading.Thread(target=encode)
        worker.start()
        decoded = [alone.predict(**point)[1] for _ in range(5)]
        worker.join()
        short_lived: list[Any] = [None] * count

        def one(i: int) -> None:
            predictor = sam_mlx.SamPredictor(model, sizing=sizing[0], size=sizing[1])
            predictor.set_image(image)
            short_lived[i] = predictor.predict(**point)[1]

        started = time.perf_counter()
        for i in range(count):
            thread = threading.Thread(target=one, args=(i,))
            thread.start()
            thread.join()
        seconds = time.perf_counter() - started
    return {"worker_encoding_equal": bool(np.array_equal(found.get("tokens"), expected_tokens)),
            "decodes_meanwhile_equal": all(np.array_equal(d, expected_scores) for d in decoded),
            "short_lived_threads": count, "short_lived_equal": all(np.array_equal(s, expected_scores)
                                                                   for s in short_lived),
            "short_lived_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("device_report.json"), help="the JSON report")
    parser.add_argument("--checkpoint", type=Path, help="MobileSAM's checkpoint (mobile_sam.pt): real weights")
    parser.add_argument("--photos", type=Path, help="a folder of photos for the real weights and the timings")
    parser.add_argument("--budget", type=float, default=360.0, help="seconds after which steps are skipped")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (two blocks, 256 pixels): the check's test")
    parser.add_argument("--only-tf32-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only_tf32_probe:
        tf32_probe(args.quick)
        return
    for given, what in ((args.checkpoint, "file"), (args.photos, "folder")):
        if given is not None and not (given.is_file() if what == "file" else given.is_dir()):
            parser.error(f"no such {what}: {given}")
    shapes = {name: ViTConfig(**small) if args.quick else full for name, (full, small) in SHAPES.items()}
    size, grid, repeats = (256, 8, 1) if args.quick else (1024, 32, 3)
    sizing = ("stretch", size) if args.quick else ("original", size)
    photos = photos_of(args.photos)
    image = np.array(as_rgb_array(str(photos[0]))) if photos and not args.quick else test_image(size)
    vit_b = shapes["vit_b_shaped"]
    vit_b_weights = random_vit(vit_b)
    models: dict[str, Callable[[], Sam]] = {f"vit_b_shaped {d}": (lambda d=d: build(vit_b, vit_b_weights, DTYPES[d]))
                                            for d in ("float32", "float16", "bfloat16")}
    if args.checkpoint:
        models.update({f"mobile_sam {d}": (lambda d=d: sam_mlx.load(str(args.checkpoint), dtype=d))
                       for d in ("float32", "float16")})
    report = Report(args.out, args.budget)
    report.step("environment", environment)
    # precision may take half the budget: the other steps need the rest
    report.step("precision", lambda: precision(shapes, sizing, ["float32", "bfloat16", "float16"], report.left() / 2))
    report.step("tf32", lambda: tf32(args.quick, report.left() / 3))
    if args.checkpoint and photos:
        report.step("mobile_sam", lambda: mobile_sam(args.checkpoint, photos, size))
    report.step("timings", lambda: timings(models, image, sizing, grid, repeats, report))
    # at the precision the device computes in: float16 on a GPU, float32 on a CPU (half precision is slow there)
    kept = " float16" if device() == mx.gpu else " float32"
    report.step("memory", lambda: memory({k: v for k, v in models.items() if k.endswith(kept)}, image, sizing))
    # threads: correctness, not size: stretch sizing at 256 keeps 16 short-lived threads' encodings quick
    report.step("threads", lambda: threads(models["vit_b_shaped float32"], test_image(256), ("stretch", 256),
                                           4 if args.quick else 16))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
