"""How fast a click is answered through `sam-mlx label-studio`: straight to the backend, and through a real Label
Studio's API, against `SamPredictor.predict` on the same prompts in this process, in one run.

    SAM_MLX_LABEL_STUDIO=VENV python scripts/label_studio_latency.py [--model ../shared/weights/mobile_sam.pt]

Label Studio (from its venv, as the tests start it) gets a project with truck.jpg and the backend; once the image
is encoded, rounds alternate over the same six points: `SamPredictor.predict` here; the backend's `/predict` with
the request Label Studio sends for a click (a lone positive keypoint: 3 candidates, no hint); Label Studio's
`/api/ml/{id}/interactive-annotating`, which the page calls on a click and which forwards to the backend. The ratios
are each median over `predict`'s median.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # label_studio_process and the helpers it imports

import httpx  # noqa: E402

import label_studio_process as ls  # noqa: E402
import sam_mlx  # noqa: E402  (OpenBLAS before mlx)
from helpers import IMAGES  # noqa: E402

POINTS = [(500, 375), (1100, 500), (1350, 900), (300, 880), (900, 250), (1560, 640)]  # on truck.jpg's 1800 x 1200
WIDTH, HEIGHT = 1800, 1200


def measure(model: str, rounds: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="sam_mlx_label_studio_latency_"))
    try:
        with ls.label_studio(ls.venv_bin(), folder) as (base, token, started):
            with httpx.Client(base_url=base, headers={"Authorization": f"Token {token}"}, timeout=300) as studio:
                key = ls.personal_access_token(studio)
                with ls.backend(base, key, folder / "tokens", model) as (url, _), \
                        httpx.Client(base_url=url, timeout=300) as backend:
                    project_id, task_id, ml_id = ls.truck_project(studio, url)
                    task = studio.get(f"/api/tasks/{task_id}").json()
                    result = _measure(model, studio, backend, project_id, task, ml_id, rounds)
        return {"label_studio_start_s": round(started, 1), **result}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _measure(model, studio, backend, project_id, task, ml_id, rounds) -> dict:
    predictor = sam_mlx.SamPredictor(sam_mlx.load(model))
    predictor.set_image(IMAGES / "truck.jpg")
    start = time.perf_counter()
    ls.interactive(studio, ml_id, task["id"], ls.keypoint(*POINTS[0], WIDTH, HEIGHT))  # the image encoded, if not yet
    first_click = time.perf_counter() - start
    task = {"id": task["id"], "data": task["data"]}
    times: dict[str, list[float]] = {"predict": [], "backend": [], "label_studio": []}
    for _ in range(rounds):
        for x, y in POINTS:
            start = time.perf_counter()
            predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=True)
            times["predict"].append(time.perf_counter() - start)
        for x, y in POINTS:
            body = {"tasks": [task], "project": f"{project_id}.0", "label_config": ls.SAM_CONFIG,
                    "params": {"context": {"result": [ls.keypoint(x, y, WIDTH, HEIGHT)]}}}
            start = time.perf_counter()
            backend.post("/predict", json=body).raise_for_status()
            times["backend"].append(time.perf_counter() - start)
        for x, y in POINTS:
            start = time.perf_counter()
            ls.interactive(studio, ml_id, task["id"], ls.keypoint(x, y, WIDTH, HEIGHT))
            times["label_studio"].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {"clicks_per_path": len(times["predict"]), "first_click_s": round(first_click, 2),
            **{f"{name}_median_ms": round(value, 1) for name, value in medians.items()},
            **{f"{name}_p95_ms": round(float(np.percentile(values, 95)) * 1e3, 1) for name, values in times.items()},
            "backend_over_predict": round(medians["backend"] / medians["predict"], 2),
            "label_studio_over_predict": round(medians["label_studio"] / medians["predict"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ls.MOBILE_SAM))
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 6 clicks per path (default: 5)")
    args = parser.parse_args()
    result = measure(args.model, args.rounds)
    print(json.dumps(result), file=sys.stderr)
    print("| path | click, median (p95) | over `SamPredictor.predict` |")
    print("|---|---|---|")
    print(f"| `SamPredictor.predict` in process | {result['predict_median_ms']:.1f} ms "
          f"({result['predict_p95_ms']:.1f} ms) | 1 |")
    print(f"| the backend's `/predict` (HTTP, decode, brush RLE, JSON) | {result['backend_median_ms']:.1f} ms "
          f"({result['backend_p95_ms']:.1f} ms) | {result['backend_over_predict']:.2f}x |")
    print(f"| Label Studio's `interactive-annotating` -> the backend | {result['label_studio_median_ms']:.1f} ms "
          f"({result['label_studio_p95_ms']:.1f} ms) | {result['label_studio_over_predict']:.2f}x |")


if __name__ == "__main__":
    main()
