"""Image collections on Ray: ``--ray`` gives the files of a run without it, survives a bad image and a killed
worker, resumes; the map_batches classes and the example of docs/many-images.md.

One local Ray instance (2 CPUs) serves the module; the command runs in this process (the driver), its workers
in Ray's. Runs without Ray use one row band and one OpenBLAS thread, as each of the 2 workers does by default:
row bands change the order of some float32 sums, so equal settings give equal bytes (see docs/many-images.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

import sam_mlx
from helpers import IMAGES, MOBILE_SAM, ROOT
from sam_mlx import SamAutomaticMaskGenerator, cli
from sam_mlx.checkpoints.load import load_checkpoint, save_model
from sam_mlx.io.tokens import ImageTokensError, read_image_tokens
from sam_mlx.ops import blas
from sam_mlx.ray_data import EncodeImages, SegmentEverything, SegmentPrompts, set_image_from_row

PHOTOS = ("dog.jpg", "groceries.jpg", "truck.jpg")
SMALL = ["--sizing", "stretch", "--size", "512"]


@pytest.fixture(autouse=True, scope="module")
def _worker_threads_restored():
    """The map_batches classes, and the command with Ray in this process, set the process's row bands and OpenBLAS
    threads as a Ray worker's (``ray_data.use_threads``): both are restored after this module, or the tests after
    it would run with one band."""
    bands = os.environ.get("SAM_MLX_BANDS")
    threads = blas._library.openblas_get_num_threads() if blas._library else None
    yield
    if bands is None:
        os.environ.pop("SAM_MLX_BANDS", None)
    else:
        os.environ["SAM_MLX_BANDS"] = bands
    if threads is not None:
        blas.set_threads(threads)


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """MobileSAM as sam_mlx safetensors: every worker loads it without converting."""
    path = tmp_path_factory.mktemp("model") / "mobile_sam.safetensors"
    save_model(load_checkpoint(MOBILE_SAM), path)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The shared photos and a file that is not an image."""
    folder = tmp_path_factory.mktemp("photos")
    for name in PHOTOS:
        (folder / name).symlink_to(IMAGES / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    return folder


def run(*args: str, one_thread: bool = False) -> tuple[int, list[dict]]:
    """``sam-mlx ARGS --json`` in this process: the exit code and the JSON lines, without timings.

    ``one_thread``: one row band and one OpenBLAS thread, as a Ray worker with 1 CPU has.
    """
    before = (os.environ.get("SAM_MLX_BANDS"), blas._library.openblas_get_num_threads() if blas._library else None)
    if one_thread:
        os.environ["SAM_MLX_BANDS"] = "1"
        blas.set_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main([*args, "--json"])
    finally:
        if before[0] is None:
            os.environ.pop("SAM_MLX_BANDS", None)
        else:
            os.environ["SAM_MLX_BANDS"] = before[0]
        if before[1] is not None:
            blas.set_threads(before[1])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    for line in lines:
        line.pop("seconds", None)
    return code, lines


def files(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) by relative path; COCO's creation date left out."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name.startswith("coco"):
                data = re.sub(rb'"date_created":"[^"]*"', b"", data)
            found[path.relative_to(folder).as_posix()] = data
    return found


def relative(lines: list[dict], folder: Path) -> list[dict]:
    """JSON lines with the output folder's name taken out of the file paths."""
    return json.loads(json.dumps(lines).replace(str(folder), "OUT"))


@pytest.fixture(scope="module")
def everything_runs(ray_instance, model, photos, tmp_path_factory):
    """``everything`` with every export over the photos: without Ray, then with Ray (2 workers)."""
    args = ["everything", str(photos), "--model", model, "--points-per-side", "4", "--export",
            "png,cutout,coco,coco-rle,yolo,labelme", *SMALL]
    plain, on_ray = tmp_path_factory.mktemp("plain"), tmp_path_factory.mktemp("ray")
    plain_run = run(*args, "--out-dir", str(plain), one_thread=True)
    ray_run = run(*args, "--out-dir", str(on_ray), "--ray")
    return args, (plain, plain_run), (on_ray, ray_run)


def test_everything_on_ray_writes_the_same_files(everything_runs):
    _, (plain, (plain_code, plain_lines)), (on_ray, (ray_code, ray_lines)) = everything_runs
    assert plain_code == ray_code == 1  # broken.jpg
    assert files(on_ray) == files(plain)
    assert {"dog.json", "coco.json", "coco_rle.json", "yolo/truck.txt", "labelme/groceries.json",
            "failures.json"} <= set(files(plain))
    assert relative(ray_lines, on_ray) == relative(plain_lines, plain)


def test_a_bad_image_is_recorded_and_the_others_written(everything_runs, photos):
    _, _, (on_ray, (_, lines)) = everything_runs
    failures = json.loads((on_ray / "failures.json").read_text())["failures"]
    assert [f["image"] for f in failures] == [str(photos / "broken.jpg")]
    assert "not a readable image" in failures[0]["error"]
    assert [Path(line["image"]).name for line in lines[:-1]] == ["broken.jpg", *PHOTOS]  # in the folder's order
    assert lines[-1]["summary"]["failed"] == 1 and all((on_ray / f"{Path(p).stem}.json").is_file() for p in PHOTOS)


def test_resume_skips_complete_images_and_redoes_the_others(everything_runs, tmp_path):
    args, (plain, _), (on_ray, _) = everything_runs
    out = tmp_path  # as deep as on_ray: LabelMe's imagePath is relative
    shutil.copytree(on_ray, out, dirs_exist_ok=True)
    (out / "dog.json").unlink()  # the report is written last: the dog was not finished
    (out / "truck_mask0.png").unlink()  # a file the truck's report lists is missing
    (out / "coco.json").unlink()
    code, lines = run(*args, "--out-dir", str(out), "--ray", "--resume")
    assert code == 1
    skipped = {Path(line["image"]).name for line in lines if line.get("skipped")}
    assert skipped == {"groceries.jpg"}
    assert files(out) == files(plain)  # the groceries' COCO annotations remade from its report


def test_resume_redoes_images_of_other_settings(everything_runs, tmp_path):
    args, _, (on_ray, _) = everything_runs
    out = tmp_path
    shutil.copytree(on_ray, out, dirs_exist_ok=True)
    for name in ("dog", "groceries"):
        for path in out.glob(f"{name}*"):
            path.unlink()
    # without Ray: the truck alone, with another threshold
    code, lines = run(*args, "--out-dir", str(out), "--resume", "--pred-iou-thresh", "0.9", one_thread=True)
    assert code == 1 and not any(line.get("skipped") for line in lines)
    assert json.loads((out / "truck.json").read_text())["settings"]["pred_iou_thresh"] == 0.9


def test_encode_and_segment_on_ray_write_the_same_files(ray_instance, model, photos, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([
        {"image": str(photos / "dog.jpg"), "boxes": [[200, 50, 650, 500]], "label": "dog"},
        {"image": str(photos / "truck.jpg"), "points": [[500, 375]], "label": "window"},
        {"image": str(photos / "dog.jpg"), "points": [[700, 100]], "label": "floor"},
        {"image": str(photos / "broken.jpg"), "points": [[1, 1]]},
    ]))
    commands = {"encode": ["encode", str(photos), "--model", model, *SMALL],
                "segment": ["segment", "--prompts", str(prompts), "--model", model, "--export", "png,coco,yolo",
                            *SMALL]}
    for name, args in commands.items():
        plain, on_ray = tmp_path / f"{name}_plain", tmp_path / f"{name}_ray"
        plain_run = run(*args, "--out-dir", str(plain), one_thread=True)
        ray_run = run(*args, "--out-dir", str(on_ray), "--ray", "--batch-size", "2")
        assert plain_run[0] == ray_run[0] == 1, name
        assert files(on_ray) == files(plain), name
        assert relative(ray_run[1], on_ray) == relative(plain_run[1], plain), name
    tokens = sorted(p.name for p in (tmp_path / "encode_ray").iterdir())
    assert tokens == ["dog.tokens.safetensors", "failures.json", "groceries.tokens.safetensors",
                      "truck.tokens.safetensors"]
    predictor = sam_mlx.SamPredictor(sam_mlx.load(model), sizing="stretch", size=512)
    predictor.set_image(IMAGES / "truck.jpg")
    saved = read_image_tokens(tmp_path / "encode_ray" / "truck.tokens.safetensors")
    np.testing.assert_allclose(np.array(saved.tokens), np.array(predictor.features), atol=1e-5)


def _command_workers() -> set[int]:
    """PIDs of this process's Ray actors that run a command's images (Ray names the process after the actor)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parents[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), command)
    mine = set()
    for pid, (_, command) in parents.items():
        if b"_CommandWorker" not in command:
            continue
        ancestor = pid
        while ancestor in parents and ancestor != os.getpid():
            ancestor = parents[ancestor][0]
        if ancestor == os.getpid():
            mine.add(pid)
    return mine


def test_a_killed_worker_is_retried_and_the_outputs_are_complete(ray_instance, model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for copy in range(3):
        for name in PHOTOS:
            Image.open(IMAGES / name).transpose(copy).save(folder / f"{Path(name).stem}_{copy}.jpg")
    args = ["encode", str(folder), "--model", model, *SMALL]
    _, expected = run(*args, "--out-dir", str(tmp_path / "plain"), one_thread=True)
    out = tmp_path / "ray"
    killed: list[int] = []

    def kill_a_worker_mid_job() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            workers = _command_workers()
            if workers and any(out.glob("*.safetensors")):  # working: one image done, 8 to go
                pid = min(workers)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker_mid_job)
    killer.start()
    code, lines = run(*args, "--out-dir", str(out), "--ray")
    killer.join()
    assert killed, "no worker was killed"
    assert code == 0 and lines[-1]["summary"] == {"images": 9, "failed": 0, "files": []}
    assert files(out) == files(tmp_path / "plain")  # every tokens file, no temporary left
    assert relative(lines, out) == relative(expected, tmp_path / "plain")


def test_ray_options(ray_instance, model, photos, capsys):
    assert cli.main(["encode", str(photos), "--model", model, "--workers", "2"]) == 1
    assert "--workers goes with --ray" in capsys.readouterr().err
    assert cli.main(["encode", str(photos), "--model", model, "--ray", "--worker-resource", "mlx=1"]) == 1
    assert "no room for a worker that reserves 1 CPU, 1 mlx" in capsys.readouterr().err
    assert cli.main(["encode", str(photos), "--model", model, "--ray", "--workers", "3"]) == 1
    assert "room for 2 workers" in capsys.readouterr().err
    assert cli.main(["encode", str(photos), "--out", "x.safetensors", "--model", model]) == 1
    assert "--out FILE takes one image" in capsys.readouterr().err


# ---------------------------------------------------------------- the map_batches classes, without Ray
def test_encode_images_rows_prompt_as_set_image(model):
    encoder = EncodeImages(model, sizing="stretch", size=512, threads=1)
    truck = np.asarray(Image.open(IMAGES / "truck.jpg").convert("RGB"))
    batch = {"image": np.array([truck, np.zeros((2, 2, 4), np.uint8), truck[:0]], dtype=object),
             "path": np.array(["truck.jpg", "tiny.png", "empty.png"])}
    rows = encoder(batch)
    assert "image" not in rows and list(rows["path"]) == list(batch["path"])
    assert list(rows["error"][:2]) == ["", ""] and "empty" in rows["error"][2]
    assert rows["tokens"][0].shape == (21, 32, 256) and tuple(rows["original_size"][0]) == (1200, 1800)

    predictor = sam_mlx.SamPredictor(encoder.model, sizing="stretch", size=512)
    predictor.set_image(truck)
    from_row = sam_mlx.SamPredictor(predictor.model, sizing="stretch", size=512)
    set_image_from_row(from_row, {key: values[0] for key, values in rows.items()})
    point = (np.array([[500, 375]]), np.array([1]))
    np.testing.assert_array_equal(from_row.predict(*point)[0], predictor.predict(*point)[0])
    with pytest.raises(ImageTokensError, match="another sizing"):
        set_image_from_row(sam_mlx.SamPredictor(predictor.model),
                           {key: values[0] for key, values in rows.items()})
    with pytest.raises(ImageTokensError, match="failed to encode"):
        set_image_from_row(from_row, {key: values[2] for key, values in rows.items()})


def test_segment_rows_match_the_generator_and_the_command(model):
    everything = SegmentEverything(model, threads=1, points_per_side=4, sizing="stretch", size=512)
    rows = everything({"path": np.array([str(IMAGES / "dog.jpg"), str(IMAGES / "missing.jpg")])})
    generator = SamAutomaticMaskGenerator(everything.model, points_per_side=4, output_mode="coco_rle",
                                          sizing="stretch", size=512)
    assert json.loads(rows["annotations"][0]) == generator.generate(IMAGES / "dog.jpg")
    assert rows["error"][1].startswith("image not found") and rows["annotations"][1] == "[]"

    prompts = SegmentPrompts(model, sizing="stretch", size=512, threads=1)
    rows = prompts({"path": np.array([str(IMAGES / "dog.jpg")] * 2),
                    "points": np.array([np.array([[250.0, 400.0]]), np.zeros((0, 2))], dtype=object),
                    "boxes": np.array([np.zeros((0, 4)), np.array([[200.0, 50, 650, 500]])], dtype=object),
                    "label": np.array(["dog", ""])})
    point, box = (json.loads(masks) for masks in rows["masks"])
    assert [m["mask_index"] for m in point] == [0, 1, 2] and point[0]["label"] == "dog"
    assert len(box) == 1 and box[0]["prompt"]["box"] == [200.0, 50.0, 650.0, 500.0] and box[0]["label"] is None
    predictor = sam_mlx.SamPredictor(prompts.model, sizing="stretch", size=512)
    predictor.set_image(IMAGES / "dog.jpg")
    _, scores, _ = predictor.predict(np.array([[250.0, 400.0]]), np.array([1]))
    np.testing.assert_allclose([m["score"] for m in point], scores, atol=1e-5)


# ---------------------------------------------------------------- the docs' example
def test_docs_pipeline_example_runs(ray_instance, model, tmp_path):
    page = (ROOT / "docs" / "many-images.md").read_text()
    section = page[page.index("## Your own Ray pipeline"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"../shared/weights/mobile_sam.pt"' in code
    code = code.replace('"../shared/weights/mobile_sam.pt"', repr(model))  # converted once for the module
    for folder in ("tokens", "masks"):  # workers write relative paths in their own folder: Ray's, not the test's
        code = code.replace(f'write_parquet("{folder}")', f"write_parquet({str(tmp_path / folder)!r})")
    exec(compile(code.replace("../shared", str(IMAGES.parent)), "docs/many-images.md", "exec"), {})
    tokens = ray.data.read_parquet(str(tmp_path / "tokens")).take_all()
    masks = ray.data.read_parquet(str(tmp_path / "masks")).take_all()
    assert sorted(Path(row["path"]).name for row in tokens) == sorted(PHOTOS)
    assert all(row["error"] == "" and np.asarray(row["tokens"]).shape == (64, 64, 256) for row in tokens)
    assert all(row["error"] == "" and json.loads(row["annotations"]) for row in masks)
