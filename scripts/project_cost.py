#!/usr/bin/env python
"""What keeping the app's work in its project costs: the time a save takes next to a click's decode, and the
project file's size per 1,000 objects.

Real masks: MobileSAM (../shared/weights) on truck.jpg (1800 x 1200), one click at each of ``--points`` points.
1. In this process: ``Project.add_step`` (COCO RLE of the mask, one SQLite transaction) for each mask, and the
   server's whole save of a step (the page's 1-bit PNG decoded, then ``add_step``), against
   ``SamPredictor.predict`` of the same click: medians and their ratio.
2. Over HTTP, against a real ``sam-mlx app``: ``POST /api/objects/ID/steps`` (what the page sends after a click's
   mask is shown) against ``POST /api/decode`` (the click itself) and ``GET /api/info`` (a request that does
   nothing: the HTTP round trip itself), medians of ``--saves`` each.
3. ``--objects`` objects of ``--steps`` steps each written to a fresh project: its file size per 1,000 objects.

    python scripts/project_cost.py [--saves 200 --objects 1000 --steps 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "app")]  # app_process and its helpers

import numpy as np  # noqa: E402
from app_process import start_app  # noqa: E402

import sam_mlx  # noqa: E402
from helpers import IMAGES, MOBILE_SAM  # noqa: E402
from sam_mlx.app.masks import encode_mask  # noqa: E402
from sam_mlx.app.project import Project, Step  # noqa: E402
from sam_mlx.app.project_api import _step  # noqa: E402
from sam_mlx.checkpoints.load import load_checkpoint  # noqa: E402
from sam_mlx.io.images import pixel_fingerprint  # noqa: E402

TRUCK = 1  # in the app's folder of dog.jpg and truck.jpg


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def clicks(count: int) -> list[tuple[float, float]]:
    """``count`` points spread over the truck photo (a grid, row by row)."""
    side = int(np.ceil(np.sqrt(count)))
    xs, ys = np.linspace(100, 1700, side), np.linspace(150, 1050, side)
    return [(float(x), float(y)) for y in ys for x in xs][:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=40, help="clicks that make the masks (default: 40)")
    parser.add_argument("--saves", type=int, default=200, help="saves and decodes timed over HTTP (default: 200)")
    parser.add_argument("--objects", type=int, default=1000, help="objects written for the size (default: 1000)")
    parser.add_argument("--steps", type=int, default=2, help="steps per object for the size (default: 2)")
    args = parser.parse_args()

    predictor = sam_mlx.SamPredictor(load_checkpoint(MOBILE_SAM))
    predictor.set_image(IMAGES / "truck.jpg")
    height, width = predictor.original_size
    masks, decode_times = [], []
    for x, y in clicks(args.points):
        start = time.perf_counter()
        candidates, scores, _ = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
        decode_times.append(time.perf_counter() - start)
        masks.append(candidates[int(scores.argmax())])
    pngs = [{"png": encode_mask(mask, "png")["png"]} for mask in masks]
    print(f"{len(masks)} MobileSAM masks of truck.jpg ({width}x{height}); mean area "
          f"{np.mean([m.mean() for m in masks]) * 100:.1f}% of the image")

    with tempfile.TemporaryDirectory() as folder:
        with Project(Path(folder) / "cost.sqlite") as project:
            image = project.add_image("/photos/truck.jpg", width, height, pixel_fingerprint(np.zeros((1, 1, 3))))
            record = project.image(image)
            obj = project.add_object(image, "object", "#ff0000")
            store, server = [], []
            for _ in range(max(1, args.saves // len(masks))):
                for (x, y), mask, png in zip(clicks(len(masks)), masks, pngs):
                    points = [[x, y, 1]]
                    start = time.perf_counter()
                    project.add_step(obj, sam_mlx_step(points, mask))
                    store.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    project.add_step(obj, _step({"points": points, "multimask": True, "selected": 0, "score": 0.9,
                                                 "mask": png}, record))
                    server.append(time.perf_counter() - start)
        decode = median_ms(decode_times)
        print(f"in process: decode (predict) {decode:.2f} ms; add_step {median_ms(store):.2f} ms "
              f"({median_ms(store) / decode:.3f}x a decode); the server's save of a page's PNG "
              f"{median_ms(server):.2f} ms ({median_ms(server) / decode:.3f}x)")

        size_file = Path(folder) / "size.sqlite"
        with Project(size_file) as project:
            image = project.add_image("/photos/truck.jpg", width, height, pixel_fingerprint(np.ones((1, 1, 3))))
            for number in range(args.objects):
                first = sam_mlx_step([[10.0, 10.0, 1]], masks[number % len(masks)])
                obj = project.add_object(image, f"object {number}", "#00ff00", first)
                for step in range(1, args.steps):
                    project.add_step(obj, sam_mlx_step([[10.0, 10.0, 1], [20.0, 20.0, 0]],
                                                       masks[(number + step) % len(masks)]))
            project._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = size_file.stat().st_size
        print(f"project size: {size / 2**20:.2f} MB for {args.objects} objects of {args.steps} steps "
              f"({size / args.objects * 1000 / 2**20:.2f} MB per 1,000 objects, "
              f"{size / (args.objects * args.steps) / 1024:.1f} KB per step)")

    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        (root / "photos").mkdir()
        for name in ("dog.jpg", "truck.jpg"):
            (root / "photos" / name).write_bytes((IMAGES / name).read_bytes())
        app = start_app(str(root / "photos"), "--out-dir", str(root / "export"), "--tokens-dir", str(root / "tokens"))
        try:
            app.wait_ready(TRUCK)
            with app.client() as client:
                points = clicks(len(masks))
                first = {"points": [[*points[0], 1]], "multimask": True, "selected": 0, "mask": pngs[0]}
                obj = client.post(f"/api/images/{TRUCK}/objects", json={"label": "o", "color": "#fff",
                                                                         "step": first}).json()["object"]
                saves, decodes, nothing = [], [], []
                for number in range(args.saves):
                    start = time.perf_counter()
                    client.get("/api/info")
                    nothing.append(time.perf_counter() - start)
                    x, y = points[number % len(points)]
                    start = time.perf_counter()
                    client.post("/api/decode", json={"image": TRUCK, "points": [[x, y]], "labels": [1]})
                    decodes.append(time.perf_counter() - start)
                    step = {"points": [[x, y, 1]], "multimask": True, "selected": 0, "mask": pngs[number % len(pngs)]}
                    start = time.perf_counter()
                    client.post(f"/api/objects/{obj}/steps", json={"step": step}).raise_for_status()
                    saves.append(time.perf_counter() - start)
        finally:
            app.stop()
    save, trip = median_ms(saves), median_ms(nothing)
    print(f"over HTTP: a click's decode {median_ms(decodes):.2f} ms; a step's save {save:.2f} ms "
          f"({save / median_ms(decodes):.3f}x); a request that does nothing {trip:.2f} ms: the save adds "
          f"{save - trip:.2f} ms to the round trip (medians of {args.saves})")


def sam_mlx_step(points: list[list[float]], mask: np.ndarray) -> Step:
    return Step(points=points, box=None, multimask=len(points) == 1, selected=0, score=0.9, mask=mask)


if __name__ == "__main__":
    main()
