"""Predictors work from any thread, several at once, and a process that used them in threads exits cleanly.

MLX streams belong to the thread that made them, and MLX keeps compiled functions' state per thread.
Real threads run the real MobileSAM (stretch sizing at 256 to keep it quick) with two row bands, so
every encode and decode uses a second stream; each result must equal the single-threaded one exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, ROOT
from sam_mlx import SamAutomaticMaskGenerator
from sam_mlx.checkpoints.load import load_checkpoint

POINTS = [(500, 375), (600, 200), (300, 450)]  # inside the 800 x 534 dog and the 1800 x 1200 truck


@pytest.fixture(autouse=True)
def two_bands(monkeypatch):
    """Two row bands (two MLX streams per thread) even on a one-core machine."""
    monkeypatch.setenv("SAM_MLX_BANDS", "2")


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(MOBILE_SAM)


def new_predictor(model) -> sam_mlx.SamPredictor:
    return sam_mlx.SamPredictor(model, sizing="stretch", size=256)


def prompt(predictor: sam_mlx.SamPredictor, point: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return predictor.predict(point_coords=np.array([point]), point_labels=np.array([1]))


def in_thread(fn, *args):
    """fn(*args) in a new thread (joined); its result, or its exception raised here."""
    result = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as error:  # re-raised in the calling thread
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def assert_same(got, expected):
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def single_threaded(model) -> dict[str, list]:
    """Every photo's prompts, all in this thread: the results the threads must give."""
    predictor = new_predictor(model)
    out = {}
    for name in ("truck", "dog"):
        predictor.set_image(IMAGES / f"{name}.jpg")
        out[name] = [prompt(predictor, p) for p in POINTS]
    return out


def test_predictor_made_in_one_thread_serves_others(model, single_threaded):
    predictor = new_predictor(model)
    predictor.set_image(IMAGES / "truck.jpg")  # encoded here, prompted in a worker
    assert_same(in_thread(prompt, predictor, POINTS[0]), single_threaded["truck"][0])
    in_thread(predictor.set_image, IMAGES / "dog.jpg")  # encoded in one worker, prompted in another and here
    assert_same(in_thread(prompt, predictor, POINTS[1]), single_threaded["dog"][1])
    assert_same(prompt(predictor, POINTS[2]), single_threaded["dog"][2])


def test_one_predictor_shared_by_a_thread_pool(model, single_threaded):
    predictor = new_predictor(model)
    predictor.set_image(IMAGES / "truck.jpg")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: prompt(predictor, p), POINTS * 4))
    for point, got in zip(POINTS * 4, results, strict=True):
        assert_same(got, single_threaded["truck"][POINTS.index(point)])


def test_several_predictors_in_several_threads_at_once(model, single_threaded):
    start = threading.Barrier(2)

    def segment(name: str) -> list:
        predictor = new_predictor(model)
        start.wait()
        predictor.set_image(IMAGES / f"{name}.jpg")
        return [prompt(predictor, p) for p in POINTS]

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(("truck", "dog"), pool.map(segment, ("truck", "dog")), strict=True))
    for name, got in results.items():
        for one, expected in zip(got, single_threaded[name], strict=True):
            assert_same(one, expected)


def test_segment_everything_in_a_worker_thread(model):
    def everything():
        generator = SamAutomaticMaskGenerator(model, points_per_side=8, sizing="stretch", size=512)
        return generator.generate(str(IMAGES / "dog.jpg"))

    here = everything()
    there = in_thread(everything)
    assert len(here) == len(there) > 0
    for a, b in zip(here, there, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["predicted_iou"] == b["predicted_iou"]


def test_process_whose_model_ran_in_worker_threads_exits_cleanly(tmp_path):
    script = textwrap.dedent(f"""
        import threading
        from concurrent.futures import ThreadPoolExecutor
        import numpy as np
        import sam_mlx

        model = sam_mlx.load({str(MOBILE_SAM)!r})
        predictor = sam_mlx.SamPredictor(model, sizing="stretch", size=256)

        def work(point):
            predictor.set_image({str(IMAGES / "truck.jpg")!r})
            return predictor.predict(point_coords=np.array([point]), point_labels=np.array([1]))[1]

        thread = threading.Thread(target=work, args=((500, 375),))
        thread.start()
        thread.join()
        pool = ThreadPoolExecutor(2)  # left for the interpreter to shut down at exit
        print(list(pool.map(work, [(500, 375), (900, 600)])))
        idle = threading.Thread(target=threading.Event().wait, daemon=True)  # alive at exit
        idle.start()
        print("finished")
    """)
    env = dict(os.environ, SAM_MLX_BANDS="2")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.strip().endswith("finished")
