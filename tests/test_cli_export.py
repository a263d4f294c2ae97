"""The command's exports and rough edges: --export for segment and everything (every format read back by
its consumer), --prompts, folders that survive a bad file, --json, --recursive, --version, info's dtypes,
the slow-BLAS warning.

Runs that encode images are few: one ``segment --prompts`` (two photos and a broken file) and one
``everything`` (two photos, a 4 x 4 grid) as subprocesses; the rest stop before the model or run in-process.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import sam_mlx
from export_readers import coco_masks, iou, labelme_masks, yolo_masks
from helpers import IMAGES, MOBILE_SAM
from sam_mlx import cli
from sam_mlx.amg.mask_utils import coco_decode_rle
from sam_mlx.checkpoints.load import load_checkpoint, save_model
from sam_mlx.cli.run import _run_images
from test_cli import env, ok, read_mask, run  # noqa: F401  (env: the module's fixture)

MODEL = str(MOBILE_SAM)
ALL = "png,cutout,coco,coco-rle,yolo,labelme"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """photos/{broken.jpg, dog.jpg, sub/groceries.jpg}."""
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    (folder / "dog.jpg").symlink_to(IMAGES / "dog.jpg")
    (folder / "sub" / "groceries.jpg").symlink_to(IMAGES / "groceries.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    return folder


PROMPTS = [  # image paths relative to the prompts file, which is written beside the photos' folder
    {"image": "{photos}/dog.jpg", "boxes": [[200, 50, 650, 500]], "label": "dog"},
    {"image": "{photos}/broken.jpg", "points": [[1, 1]]},
    {"image": "{photos}/sub/groceries.jpg", "points": [[250, 400]], "boxes": [[100, 150, 350, 480]], "label": "bag"},
    {"image": "{photos}/dog.jpg", "points": [[700, 100]], "labels": [1], "label": "floor"},
]


@pytest.fixture(scope="module")
def segmented(env, photos, tmp_path_factory):  # noqa: F811
    """``segment --prompts`` over the photos with every format and --json: (result, out folder)."""
    root = photos.parent
    prompts = [{**entry, "image": entry["image"].format(photos=photos.name)} for entry in PROMPTS]
    (root / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path_factory.mktemp("segmented")
    result = run(env, "segment", "--prompts", str(root / "prompts.json"), "--export", ALL, "--json",
                 "--out-dir", str(out), "--model", MODEL)
    return result, out


def test_segment_prompts_file_survives_a_bad_file(segmented, photos):
    result, out = segmented
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # stdout: JSON only
    assert [line.get("image") for line in lines[:3]] == [str(photos / p) for p in
                                                          ("dog.jpg", "broken.jpg", "sub/groceries.jpg")]
    dog, broken, groceries, summary = lines
    assert "not a readable image" in broken["error"]
    assert len(dog["scores"]) == 4 and len(groceries["scores"]) == 1  # a box (1 mask) + a lone point (3)
    assert set(dog["seconds"]) == {"load", "encode", "decode", "write", "total"}
    assert all(Path(f).is_file() for f in dog["files"] + groceries["files"])
    assert summary["summary"]["images"] == 3 and summary["summary"]["failed"] == 1
    assert {Path(f).name for f in summary["summary"]["files"]} == {"coco.json", "coco_rle.json", "classes.txt",
                                                                   "failures.json"}
    failures = json.loads((out / "failures.json").read_text())["failures"]
    assert [f["image"] for f in failures] == [str(photos / "broken.jpg")]
    stderr = result.stderr.strip().splitlines()
    assert stderr[-2].endswith("1 of 3 images failed (listed in " + str(out / "failures.json") + "):")
    assert "broken.jpg: " in stderr[-1] and "not a readable image" in stderr[-1]


def test_segment_exports_read_back(segmented, photos):
    """Labels from the prompts file in every format; each format's masks are the PNG masks."""
    _, out = segmented
    report = json.loads((out / "dog.json").read_text())
    assert [(m["label"], m["prompt_index"], m["multimask"]) for m in report["masks"]] == [
        ("dog", 0, False), ("floor", 1, True), ("floor", 1, True), ("floor", 1, True)]
    pngs = [read_mask(out / m["file"]) for m in report["masks"]]
    for record, mask in zip(report["masks"], pngs):
        cutout = np.asarray(Image.open(out / record["cutout"]))
        assert np.array_equal(cutout[..., 3] > 127, mask)
    assert sorted(report["exports"]) == sorted(
        [f"dog_{kind}{i}.png" for kind in ("mask", "cutout") for i in range(4)] + ["yolo/dog.txt", "labelme/dog.json"])

    coco, polygons = coco_masks(out / "coco.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["dog", "floor", "bag"]  # in order of the images
    assert [i["file_name"] for i in coco.dataset["images"]] == ["dog.jpg", "groceries.jpg"]
    anns = [coco.anns[i] for i in sorted(coco.anns) if coco.anns[i]["image_id"] == 1]
    assert [a["category_id"] for a in anns] == [1, 2, 2, 2]
    _, rles = coco_masks(out / "coco_rle.json")
    for ann, mask, record in zip(anns, pngs, report["masks"]):
        assert iou(polygons[ann["id"]], mask) >= 0.98 and np.array_equal(rles[ann["id"]], mask)
        assert ann["score"] == pytest.approx(record["score"]) and ann["prompt"] == record["prompt"]
        x, y, w, h = record["bbox"]  # Meta's convention in the report, COCO's in the export
        assert ann["bbox"] == [x, y, w + 1, h + 1] and ann["area"] == record["area"]

    assert (out / "yolo/classes.txt").read_text() == "dog\nfloor\nbag\n"
    lines = yolo_masks(out / "yolo/dog.txt", 800, 534)
    assert [cls for cls, _ in lines] == [0, 1, 1, 1]
    ious = [iou(raster, mask) for (_, raster), mask in zip(lines, pngs)]
    assert min(ious) >= 0.95, ious

    document, instances = labelme_masks(out / "labelme/dog.json")
    assert (out / "labelme" / document["imagePath"]).resolve() == (IMAGES / "dog.jpg").resolve()
    assert sorted(instances) == [("dog", 0), ("floor", 1), ("floor", 2), ("floor", 3)]
    for (_, index), raster in instances.items():
        assert iou(raster, pngs[index]) >= 0.98


@pytest.fixture(scope="module")
def everything(env, photos, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("everything")
    result = ok(run(env, "everything", str(photos / "dog.jpg"), str(photos / "sub"), "--export", ALL, "--json",
                    "--points-per-side", "4", "--points-per-batch", "16", "--out-dir", str(out), "--model", MODEL))
    return result, out


def test_everything_takes_several_inputs_and_exports_every_format(everything):
    result, out = everything
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["image"]).name for line in lines[:2]] == ["dog.jpg", "groceries.jpg"]
    assert set(lines[0]["seconds"]) == {"load", "generate", "write", "total"} and lines[2]["summary"]["failed"] == 0
    coco, polygons = coco_masks(out / "coco.json")
    _, rles = coco_masks(out / "coco_rle.json")
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["object"]
    for image_id, stem in ((1, "dog"), (2, "groceries")):
        report = json.loads((out / f"{stem}.json").read_text())
        records = report["annotations"]
        assert records, f"no masks on {stem}"
        masks = [coco_decode_rle(r["segmentation"]) for r in records]
        for i, mask in enumerate(masks):
            assert np.array_equal(read_mask(out / f"{stem}_mask{i}.png"), mask)
            assert np.array_equal(np.asarray(Image.open(out / f"{stem}_cutout{i}.png"))[..., 3] > 127, mask)
        anns = [coco.anns[i] for i in sorted(coco.anns) if coco.anns[i]["image_id"] == image_id]
        assert len(anns) == len(masks)
        for ann, mask, record in zip(anns, masks, records):
            assert iou(polygons[ann["id"]], mask) >= 0.98 and np.array_equal(rles[ann["id"]], mask)
            assert ann["predicted_iou"] == pytest.approx(record["predicted_iou"])
            assert ann["stability_score"] == pytest.approx(record["stability_score"])
            assert ann["point_coords"] == record["point_coords"] and ann["crop_box"] == record["crop_box"]
        height, width = masks[0].shape
        yolo = yolo_masks(out / "yolo" / f"{stem}.txt", width, height)
        assert [cls for cls, _ in yolo] == [0] * len(masks)
        assert np.mean([iou(raster, mask) for (_, raster), mask in zip(yolo, masks)]) >= 0.95
        _, instances = labelme_masks(out / "labelme" / f"{stem}.json")
        assert sorted(instances) == [("object", i) for i in range(len(masks))]
        assert all(iou(instances["object", i], mask) >= 0.98 for i, mask in enumerate(masks))
    assert not (out / "yolo/classes.txt").exists()


def test_segment_recursive_best_and_fail_fast(photos, tmp_path, capsys):
    code = cli.main(["segment", str(photos), "--recursive", "--point", "250,400", "--fail-fast", "--best",
                     "--export", "cutout", "--out-dir", str(tmp_path), "--model", MODEL])
    assert code == 1 and "not a readable image" in capsys.readouterr().err  # broken.jpg comes first
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "failures.json").write_text("an earlier run's")
    photos_ok = tmp_path / "ok"
    (photos_ok / "sub").mkdir(parents=True)
    (photos_ok / "sub" / "dog.jpg").symlink_to(IMAGES / "dog.jpg")
    out = photos_ok / "out"  # inside the input folder: skipped on reruns
    for _ in range(2):
        assert cli.main(["segment", str(photos_ok), "--recursive", "--point", "250,400", "--best", "--export",
                         "cutout", "--out-dir", str(out), "--model", MODEL]) == 0
        assert "[1/1]" in capsys.readouterr().err
    report = json.loads((out / "dog.json").read_text())
    best = max(range(3), key=lambda i: report["masks"][i]["score"])
    assert [("cutout" in m) for m in report["masks"]] == [i == best for i in range(3)]
    assert report["exports"] == [f"dog_cutout{best}.png"] and not (out / f"dog_mask{best}.png").exists()
    assert cli.main(["segment", str(IMAGES / "dog.jpg"), "--point", "250,400", "--out-dir", str(tmp_path),
                     "--model", MODEL]) == 0
    assert not (tmp_path / "failures.json").exists()  # a run without failures removes an earlier list


def test_version(env):  # noqa: F811
    assert ok(run(env, "--version")).stdout.strip() == f"sam-mlx {sam_mlx.__version__}"


def test_info_shows_stored_and_compute_dtypes(tmp_path, capsys):
    import torch

    half = save_model(load_checkpoint(MOBILE_SAM, mx.float32), tmp_path / "half.safetensors", dtype="float16")
    brain = save_model(load_checkpoint(MOBILE_SAM, mx.float32), tmp_path / "brain.safetensors", dtype="bfloat16")
    state = torch.load(MOBILE_SAM, map_location="cpu", weights_only=True)
    brain_pth = tmp_path / "brain.pth"  # a .pth's bfloat16 is named as such, though the reader widens it
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, brain_pth)
    cases = ((MODEL, "float32"), (str(half), "float16"), (str(brain), "bfloat16"), (str(brain_pth), "bfloat16"))
    for model, stored in cases:
        assert cli.main(["info", "--model", model]) == 0
        out = capsys.readouterr().out
        assert f"stored dtype: {stored} (" in out and f"tensors) in {model}" in out
        assert "compute dtype: image encoder float32, prompt encoder and mask decoder float32" in out
    assert cli.main(["info", "--json", "--model", str(half)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sam_mlx"] == sam_mlx.__version__ and set(info["model"]["stored_dtypes"]) == {"float16"}
    assert info["model"]["compute_dtypes"]["image_encoder"] == "float32"


def test_slow_blas_warning(env, tmp_path):  # noqa: F811
    """One warning line before any model runs; none with OpenBLAS (the one-line error tests)."""
    result = run(env, "encode", str(IMAGES / "dog.jpg"), "--out", str(tmp_path / "t.safetensors"), "--model",
                 "weights/missing.pth", SAM_MLX_OPENBLAS="0")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2
    assert lines[0].startswith("sam-mlx encode: warning: MLX multiplies with its bundled reference BLAS")
    assert "checkpoint not found" in lines[1]


def test_missing_opencv_fails_before_the_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setattr(sam_mlx, "load", lambda *args, **kwargs: pytest.fail("loaded the model"))
    code = cli.main(["segment", str(IMAGES / "dog.jpg"), "--point", "1,1", "--export", "png,yolo",
                     "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "pip install 'sam-mlx[export]'" in err[0]


# ---------------------------------------------------------------- prompts files, folders, the run loop
def test_prompts_csv_reads_as_json(tmp_path):
    (tmp_path / "a.csv").write_text('image,points,labels,boxes,label\n'
                                    'x.jpg,"10,20; 30,40",1;0,,cat\n'
                                    'y.jpg,,,1 2 3 4 5 6 7 8,\n')
    (tmp_path / "a.json").write_text(json.dumps([
        {"image": "x.jpg", "points": [[10, 20], [30, 40]], "labels": [1, 0], "label": "cat"},
        {"image": "y.jpg", "boxes": [[1, 2, 3, 4], [5, 6, 7, 8]]}]))
    for name in ("a.csv", "a.json"):
        (x, [px]), (y, [py]) = cli.read_prompts(tmp_path / name)
        assert (x, y) == (tmp_path / "x.jpg", tmp_path / "y.jpg")
        assert px.points.tolist() == [[10, 20], [30, 40]] and px.labels.tolist() == [1, 0] and px.label == "cat"
        assert py.boxes.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and py.label is None and not len(py.points)


BAD_PROMPTS = [
    ("not json", "p.json", "{", "not valid JSON"),
    ("not a list", "p.json", '{"image": "x.jpg"}', "expected a JSON list of prompt objects"),
    ("unknown key", "p.json", '[{"image": "x.jpg", "point": [[1, 2]]}]', "entry 1: unknown key 'point'"),
    ("no image", "p.json", '[{"points": [[1, 2]]}]', "entry 1: no image"),
    ("no prompt", "p.json", '[{"image": "x.jpg"}]', "entry 1: no prompt"),
    ("label count", "p.json", '[{"image": "x.jpg", "points": [[1, 2]], "labels": [1, 0]}]', "one per point"),
    ("bad label", "p.json", '[{"image": "x.jpg", "points": [[1, 2]], "labels": [2]}]', "1 (foreground) or 0"),
    ("odd point", "p.json", '[{"image": "x.jpg", "points": [[1, 2, 3]]}]', "points must be [x, y] pairs"),
    ("4-number point", "p.json", '[{"image": "x.jpg", "points": [[1, 2, 3, 4]]}]', "points must be [x, y] pairs"),
    ("flat box", "p.json", '[{"image": "x.jpg", "boxes": [1, 2, 3, 4]}]', "boxes [x1, y1, x2, y2]"),
    ("no image column", "p.csv", "file,points\nx.jpg,1 2\n", "needs a header row with an image column"),
    ("csv odd box", "p.csv", "image,boxes\nx.jpg,1 2 3\n", "row 2, column boxes: 3 numbers, expected a multiple of 4"),
    ("csv text", "p.csv", "image,points\nx.jpg,one two\n", "row 2, column points: 'one two' is not a list"),
    ("empty", "p.json", "[]", "no prompts in the file"),
]


@pytest.mark.parametrize("name, text, message", [b[1:] for b in BAD_PROMPTS], ids=[b[0] for b in BAD_PROMPTS])
def test_bad_prompts_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(cli.CliError, match=re.escape(message)):
        cli.read_prompts(tmp_path / name)


def test_prompts_file_excludes_command_line_prompts(tmp_path, capsys):
    (tmp_path / "p.json").write_text('[{"image": "x.jpg", "points": [[1, 2]]}]')
    assert cli.main(["segment", "--prompts", str(tmp_path / "p.json"), "--point", "1,1"]) == 1
    assert "no IMAGE, --example, --point, --bg-point, --box or --label beside it" in capsys.readouterr().err
    assert cli.main(["segment", "--point", "1,1"]) == 1
    assert "no image: give IMAGE|DIR ..., --example truck or --prompts FILE" in capsys.readouterr().err


class _Work(cli.ImageWork):
    """Images named bad.jpg fail; the others are done."""

    command = "everything"

    def __init__(self, args):
        super().__init__(args)
        self.done = []

    def setup(self):
        pass

    def process(self, job, progress):
        if job.path.name == "bad.jpg":
            raise ValueError("bad.jpg: not a readable image (truncated)")
        self.done.append(job.path.name)
        return cli.ImageDone({"image": job.path.name}, "done")


@pytest.mark.parametrize("fail_fast", [False, True])
def test_run_loop_goes_on_after_a_failure(tmp_path, capsys, fail_fast):
    args = cli.build_parser().parse_args(["everything", "x", "--out-dir", str(tmp_path), "--json", "--model", "m"]
                                         + ["--fail-fast"] * fail_fast)
    work = _Work(args)
    jobs = [cli.ImageJob(Path(n), n, Path(n).stem) for n in ("a.jpg", "bad.jpg", "c.jpg")]
    if fail_fast:
        with pytest.raises(ValueError, match="truncated"):
            _run_images(args, work, jobs)
        assert work.done == ["a.jpg"] and not (tmp_path / "failures.json").exists()
        return
    assert _run_images(args, work, jobs) == 1
    assert work.done == ["a.jpg", "c.jpg"]
    assert json.loads((tmp_path / "failures.json").read_text()) == {
        "failures": [{"image": "bad.jpg", "error": "bad.jpg: not a readable image (truncated)"}]}
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[:3] == [{"image": "a.jpg"}, {"image": "bad.jpg", "error": "bad.jpg: not a readable image (truncated)"},
                       {"image": "c.jpg"}]
    assert out[3]["summary"]["failed"] == 1


def test_console_help_mentions_exports(env):  # noqa: F811
    for command in ("segment", "everything"):
        text = ok(run(env, command, "--help")).stdout
        for option in ("--export", "--simplify", "--best", "--recursive", "--fail-fast", "--json"):
            assert option in text, (command, option)
    assert "--prompts" in ok(run(env, "segment", "--help")).stdout
    result = subprocess.run([sys.executable, "-m", "sam_mlx.cli", "segment", "x.jpg", "--export", "tiff"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown export format 'tiff'" in result.stderr
