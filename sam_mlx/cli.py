"""The ``sam-mlx`` command: segment images from the shell, cache their encodings, convert checkpoints.

Every error ends as one line on stderr and a non-zero exit code (1, or 2 for bad
arguments); ``--debug`` re-raises it with its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sam_mlx  # before mlx: loads OpenBLAS first

# isort: split

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .amg.mask_utils import (  # noqa: E402
    batched_mask_to_box,
    box_xyxy_to_xywh,
    coco_decode_rle,
    coco_encode_rle,
    mask_to_rle,
    rle_to_mask,
)
from .checkpoints.hub import HubError, default_cache_dir, resolve_checkpoint  # noqa: E402
from .checkpoints.load import load_checkpoint, read_state_dict, save_model  # noqa: E402
from .io.atomic import atomic_write, locked_folder, one_set_of_files, remove_abandoned_temporaries  # noqa: E402
from .io.export import (  # noqa: E402
    COCO_FILES,
    DEFAULT_SIMPLIFY,
    FORMATS,
    Exporter,
    ExportObject,
    ImageEntry,
    parse_formats,
)
from .io.folders import ImageInput, expand_images, output_stems  # noqa: E402
from .io.images import load_image, pixel_fingerprint  # noqa: E402
from .io.overlay import draw_overlay  # noqa: E402
from .io.tokens import (  # noqa: E402
    load_image_tokens,
    model_fingerprint,
    model_identity,
    read_image_tokens,
    save_image_tokens,
)
from .ops.blas import reference_blas_in_use  # noqa: E402

MODEL_ENV = "SAM_MLX_MODEL"
FAILURES_FILE = "failures.json"
TOKENS_SUFFIX = ".tokens.safetensors"  # encode --out-dir: one STEM.tokens.safetensors per image


class CliError(Exception):
    """A user-facing failure: its message is printed as is, without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument types
def _numbers(text: str, count: int, what: str, syntax: str) -> tuple[float, ...]:
    parts = text.replace(" ", "").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}: expected {syntax} (pixel numbers)")
    return values


def _point(text: str) -> tuple[float, ...]:
    return _numbers(text, 2, "point", "X,Y")


def _box(text: str) -> tuple[float, ...]:
    return _numbers(text, 4, "box", "X1,Y1,X2,Y2")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # NaN too
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def _whole_number(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number, ``least`` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number, {least} or more, got {text!r}")
        return value

    return parse


_positive_int, _count = _whole_number(1), _whole_number(0)


def _formats(text: str) -> tuple[str, ...]:
    try:
        return parse_formats(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _non_negative(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected {what} >= 0, got {text!r}")
    return value


def _amount(text: str) -> float:
    return _non_negative(text, "an amount")


def _resource(text: str) -> tuple[str, float]:
    name, _, amount = text.partition("=")
    if not name.strip() or not amount:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT (e.g. mlx=1), got {text!r}")
    return name.strip(), _amount(amount)


def _pixels(text: str) -> float:
    return _non_negative(text, "a number of pixels")


# ---------------------------------------------------------------- helpers
def _model_name(args: argparse.Namespace) -> str | None:
    return args.model or os.environ.get(MODEL_ENV)


def _model_to_load(args: argparse.Namespace) -> str:
    name = _model_name(args)
    if not name:
        raise CliError(f"no model: pass --model NAME|PATH (e.g. sam-vit-base or a .pth file) or set {MODEL_ENV}")
    return name


def _predictor(args: argparse.Namespace, model, default_sizing: str = "original", default_size=None):
    """A SamPredictor with the --sizing / --size options, else the given defaults."""
    sizing = args.sizing or default_sizing
    size = args.size or (default_size if sizing == default_sizing else None)
    return sam_mlx.SamPredictor(model, sizing=sizing, size=size)


def _check_prompts(points: np.ndarray, boxes: np.ndarray, width: int, height: int, name: str) -> None:
    """Reject points outside the image and boxes that are inverted or outside it, before encoding."""
    for x, y in points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise CliError(f"point {x:g},{y:g} is outside {name} ({width}x{height}: x in 0..{width}, y in 0..{height})")
    for x1, y1, x2, y2 in boxes:
        if x2 < x1 or y2 < y1:
            raise CliError(f"box {x1:g},{y1:g},{x2:g},{y2:g} has X2 < X1 or Y2 < Y1")
        if x2 < 0 or y2 < 0 or x1 > width or y1 > height:
            raise CliError(f"box {x1:g},{y1:g},{x2:g},{y2:g} is outside {name} ({width}x{height})")


@dataclass
class Prompt:
    """One image's prompt: points N x 2 with labels N (1 foreground, 0 background) shared by each of the
    B x 4 boxes (every box is a prompt of its own; no box: one prompt of the points), and the object's label."""

    points: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    label: str | None = None

    def check(self, width: int, height: int, name: str) -> None:
        _check_prompts(self.points, self.boxes, width, height, name)

    def describe(self) -> dict:
        return {"points": self.points.tolist(), "labels": self.labels.tolist(), "boxes": self.boxes.tolist(),
                "label": self.label}


def _prompt(points, labels, boxes, label, where: str) -> Prompt:
    """A Prompt from lists of numbers, or a CliError naming ``where`` and what is wrong."""
    try:
        points = _rows(points, 2)
        boxes = _rows(boxes, 4)
        labels = np.array(labels if labels is not None else [1] * len(points), dtype=np.float64).reshape(-1)
    except (ValueError, TypeError):
        raise CliError(f"{where}: points must be [x, y] pairs, boxes [x1, y1, x2, y2] and labels numbers") from None
    if not (np.isfinite(points).all() and np.isfinite(boxes).all()):
        raise CliError(f"{where}: coordinates must be finite numbers")
    if len(labels) != len(points) or not np.isin(labels, (0, 1)).all():
        raise CliError(f"{where}: labels must be 1 (foreground) or 0 (background), one per point "
                       f"({len(points)} points, {len(labels)} labels)")
    if not len(points) and not len(boxes):
        raise CliError(f"{where}: no prompt (give points or boxes)")
    if label is not None and not isinstance(label, str):
        raise CliError(f"{where}: label must be a text, got {label!r}")
    return Prompt(points, labels.astype(np.int32), boxes, label or None)


def _rows(values, width: int) -> np.ndarray:
    """A list of ``width``-number lists as an N x width float array (ValueError for any other shape)."""
    rows = np.array(values if values is not None else [], dtype=np.float64)
    if rows.size and (rows.ndim != 2 or rows.shape[1] != width):
        raise ValueError(f"expected rows of {width} numbers, got shape {rows.shape}")
    return rows.reshape(-1, width)


_PROMPT_KEYS = ("image", "points", "labels", "boxes", "label")


def read_prompts(path: str | Path) -> list[tuple[Path, list[Prompt]]]:
    """A prompts file -> [(image path, its prompts)], images in order of first mention.

    JSON: a list of ``{"image": path, "points": [[x, y], ...], "labels": [1, 0, ...], "boxes": [[x1, y1,
    x2, y2], ...], "label": name}`` (labels default to 1, i.e. foreground; points or boxes may be left out).
    CSV: a header row with those columns; a cell holds its numbers separated by commas, spaces or ";"
    (``"250,400; 700,100"``). Image paths are relative to the prompts file's folder. Each entry or row is
    one prompt; an image may have several (several objects).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CliError(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    entries = _csv_prompts(path, text) if path.suffix.lower() == ".csv" else _json_prompts(path, text)
    jobs: dict[Path, list[Prompt]] = {}
    for where, entry in entries:
        unknown = sorted(set(entry) - set(_PROMPT_KEYS))
        if unknown:
            raise CliError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(_PROMPT_KEYS)})")
        if not isinstance(entry.get("image"), str) or not entry["image"]:
            raise CliError(f"{where}: no image")
        image = Path(os.path.abspath(path.parent / Path(entry["image"]).expanduser()))
        boxes = entry.get("boxes")
        jobs.setdefault(image, []).append(_prompt(entry.get("points"), entry.get("labels"), boxes, entry.get("label"),
                                                  where))
    if not jobs:
        raise CliError(f"{path}: no prompts in the file")
    return list(jobs.items())


def _json_prompts(path: Path, text: str) -> list[tuple[str, dict]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise CliError(f"{path}: expected a JSON list of prompt objects ({{\"image\": ..., \"points\": ...}})")
    return [(f"{path}: entry {i}", entry) for i, entry in enumerate(data, 1)]


def _csv_prompts(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = list(csv.DictReader(text.splitlines()))
    columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    if "image" not in columns:
        raise CliError(f"{path}: the CSV needs a header row with an image column (columns: {', '.join(_PROMPT_KEYS)})")
    entries = []
    for n, row in enumerate(rows, 2):
        where = f"{path}: row {n}"
        cells = {key.strip(): (value or "").strip() for key, value in row.items() if key is not None}
        entry: dict = {key: value for key, value in cells.items() if value}
        for key, size in (("points", 2), ("boxes", 4), ("labels", 1)):
            if key in entry:
                entry[key] = _cell_numbers(entry[key], size, f"{where}, column {key}")
        entries.append((where, entry))
    return entries


def _cell_numbers(text: str, size: int, where: str) -> list:
    parts = [p for p in re.split(r"[\s,;]+", text) if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise CliError(f"{where}: {text!r} is not a list of numbers") from None
    if len(values) % size:
        raise CliError(f"{where}: {len(values)} numbers, expected a multiple of {size}")
    return values if size == 1 else [values[i:i + size] for i in range(0, len(values), size)]


def _mask_record(mask: np.ndarray) -> dict:
    """Area and bbox of an H x W bool mask, as the automatic mask generator reports them.

    The bbox is x, y, x2 - x1, y2 - y1 of the inclusive corner pixels: Meta's convention,
    one less than COCO's width and height.
    """
    return {"area": int(mask.sum()), "bbox": box_xyxy_to_xywh(batched_mask_to_box(mask)).tolist()}


def _save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), suffix=".png")


def _write_json(data: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(_json_text(data)), suffix=".json")


def _json_text(data: dict) -> str:
    return json.dumps(_strict_json(data), indent=1, allow_nan=False) + "\n"


def _strict_json(value: object) -> object:
    """``value`` with non-finite floats as null: bare NaN and Infinity are not JSON, and strict parsers refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


@contextlib.contextmanager
def _replacing_outputs(out_dir: Path, stem: str) -> Iterator[None]:
    """Write an image's outputs (exports, overlay, ``{stem}.json``) in this block as one set replacing the last one.

    Every file goes to a temporary first and all are renamed into place only when the block succeeds, so a
    failed run (a full disk) leaves the previous set whole; then the per-mask files the previous run's own
    JSON listed and the new one does not are deleted, and no other file. Runs writing into one folder at
    once take turns on a lock of the folder, so each set on disk is one run's.
    """
    json_path = out_dir / f"{stem}.json"
    with locked_folder(out_dir):
        previous = _files_listed(json_path, stem)
        remove_abandoned_temporaries(out_dir, rf"{re.escape(stem)}(_(mask|cutout)\d+\.png|_overlay\.png|\.json)")
        with one_set_of_files():
            yield
        for name in previous - _files_listed(json_path, stem):
            (out_dir / name).unlink(missing_ok=True)


def _files_listed(json_path: Path, stem: str) -> set[str]:
    """The per-mask PNGs (masks, cut-outs) an image's JSON report lists; none if there is no report of ours."""
    try:
        report = json.loads(json_path.read_text())
        names = [m.get(key) for m in report.get("masks", []) for key in _REPORT_KEYS.values()]
        names += report.get("exports", [])
    except (OSError, ValueError, TypeError, AttributeError):
        return set()
    ours = re.compile(rf"{re.escape(stem)}_(mask|cutout)\d+\.png")
    return {name for name in names if isinstance(name, str) and ours.fullmatch(name)}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, record: dict, out=None) -> None:
    """With --json, one JSON object on a line of stdout (or ``out``; messages and progress stay on stderr)."""
    if getattr(args, "json", False):
        print(json.dumps(record), file=out or sys.stdout, flush=True)


def _warn_if_slow_blas(command: str) -> None:
    if reference_blas_in_use():
        _log(f"sam-mlx {command}: warning: MLX multiplies with its bundled reference BLAS, ~60x slower than "
             "OpenBLAS: install libopenblas0-pthread (apt-get), which sam_mlx then loads")


class _Laps:
    """Seconds spent in each named step of an image's processing."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self.last, 4)
        self.last = now

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.start, 4)}


def _exporter(args: argparse.Namespace, labels: Sequence[str] = ()) -> Exporter:
    return Exporter(args.out_dir, args.export, simplify=args.simplify, best_only=args.best, labels=labels)


@dataclass
class ImageJob:
    """One image of a run: its path as given (the reports name it so), its COCO ``file_name`` (the path below
    the folder it was found in), the stem of its output files and, for ``segment``, its prompts."""

    path: Path
    name: str
    stem: str
    prompts: list[Prompt] = field(default_factory=list)


@dataclass
class ImageDone:
    """An image's outcome: its --json record (files written, scores, seconds; ``"skipped": true`` when --resume
    found its outputs complete), the end of its progress line, and its share of the run-level exports."""

    record: dict
    message: str
    entry: ImageEntry | None = None


@dataclass
class ImageFailed:
    """An image that failed, with the error in one line."""

    error: str


def _jobs(images: Sequence[ImageInput], prompts: Sequence[list[Prompt]] | None = None) -> list[ImageJob]:
    stems = output_stems([image.path for image in images])
    prompts = prompts if prompts is not None else [[] for _ in images]
    return [ImageJob(image.path, image.name, stem, p) for image, stem, p in zip(images, stems, prompts)]


class ImageWork:
    """A command's work on one image, the same in this process and in Ray workers (``sam_mlx.ray_data``).

    Made from the command's arguments where the command runs, and picklable until ``setup`` loads the
    model where the images are processed (once per worker). ``work(job)`` writes the image's outputs, each
    file atomically; with --resume it first looks for outputs complete from a run with the same model and
    settings, and returns at once (``skipped``) when it finds them.
    """

    command = ""

    def __init__(self, args: argparse.Namespace, exporter: Exporter | None = None):
        self.args = args
        self.exporter = exporter
        self.model_name = _model_to_load(args)  # resolved here: a worker's $SAM_MLX_MODEL may differ
        self.out_dir = Path(args.out_dir)

    def setup(self) -> None:
        """Load the model (and what runs it)."""
        raise NotImplementedError

    def __call__(self, job: ImageJob, progress: Callable[[int, int], None] | None = None) -> ImageDone:
        if self.args.resume:
            done = self.resumed(job)
            if done is not None:
                return done
        return self.process(job, progress)

    def process(self, job: ImageJob, progress: Callable[[int, int], None] | None) -> ImageDone:
        raise NotImplementedError

    def resumed(self, job: ImageJob) -> ImageDone | None:
        """The image's outcome if a run with this model and settings wrote all its outputs, else None."""
        raise NotImplementedError


class _EncodeWork(ImageWork):
    """``encode``: the image tokens of each image, ``--out FILE`` or ``OUT_DIR/STEM.tokens.safetensors``."""

    command = "encode"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args)
        if args.out:
            self.out_dir = Path(args.out).parent

    def setup(self) -> None:
        self.predictor = _predictor(self.args, sam_mlx.load(self.model_name))

    def output(self, job: ImageJob) -> Path:
        return Path(self.args.out) if self.args.out else self.out_dir / f"{job.stem}{TOKENS_SUFFIX}"

    def process(self, job: ImageJob, progress: Callable[[int, int], None] | None) -> ImageDone:
        laps = _Laps()
        image = load_image(job.path)
        laps("load")
        self.predictor.set_image(image)
        laps("encode")
        path = save_image_tokens(self.predictor, self.output(job), image_name=str(job.path))
        laps("write")
        h, w = self.predictor.geometry.grid_size
        seconds = laps.total()
        return ImageDone({"image": str(job.path), "files": [str(path)], "seconds": seconds},
                         f"{h}x{w} image tokens in {seconds['total']:.1f} s -> {path}")

    def resumed(self, job: ImageJob) -> ImageDone | None:
        path = self.output(job)
        try:
            saved = read_image_tokens(path)
        except (OSError, ValueError):
            return None
        predictor = self.predictor
        if (saved.model_fingerprint, saved.sizing, saved.size) != (
                model_fingerprint(predictor.model), predictor.sizing, predictor.size):
            return None
        try:
            if saved.image_fingerprint != pixel_fingerprint(load_image(job.path)):  # the image has changed
                return None
        except (OSError, ValueError):
            return None
        return ImageDone({"image": str(job.path), "files": [str(path)], "skipped": True},
                         f"tokens complete from an earlier run -> {path}")


class _MaskWork(ImageWork):
    """What ``segment`` and ``everything`` share: an overlay, exports and a JSON report per image, the report
    written last; a report whose ``expected`` keys match and whose files all exist is complete."""

    def expected(self, job: ImageJob) -> dict:
        """The report's keys that must match for --resume: the model and the settings that shape the outputs."""
        raise NotImplementedError

    def _settings(self) -> dict:
        return {"export": list(self.args.export), "simplify": self.args.simplify, "best": self.args.best}

    def objects(self, report: dict) -> list[ExportObject]:
        """The exported masks as the report describes them (to remake the run-level exports of a resumed image)."""
        raise NotImplementedError

    def resumed(self, job: ImageJob) -> ImageDone | None:
        path = self.out_dir / f"{job.stem}.json"
        try:
            report = json.loads(path.read_text())
            expected = json.loads(json.dumps(self.expected(job)))  # tuples as lists, as the report has them
            if any(report.get(key) != value for key, value in expected.items()):
                return None
            files = [self.out_dir / name for name in (report["overlay"], *report["exports"])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if not all(file.is_file() for file in files):
            return None
        entry = None
        if any(kind in COCO_FILES for kind in self.args.export):
            entry = self.exporter.entry(job.name, report["width"], report["height"], self.objects(report))
        return ImageDone({"image": str(job.path), "files": [str(f) for f in (*files, path)], "skipped": True},
                         f"outputs complete from an earlier run -> {path}", entry)


class _SegmentWork(_MaskWork):
    command = "segment"

    def __init__(self, args: argparse.Namespace, labels: Sequence[str]):
        super().__init__(args, _exporter(args, labels))

    def setup(self) -> None:
        self.saved = read_image_tokens(self.args.tokens) if self.args.tokens else None
        # Tokens bring their own sizing: it is used unless --sizing / --size say otherwise (then refused).
        model = sam_mlx.load(self.model_name)
        if self.args.hq_token_only and not model.config.hq:
            raise CliError(f"--hq-token-only needs an HQ-SAM model; {self.model_name} ({model.config.name}) has no "
                           "HQ token")
        self.predictor = _predictor(self.args, model, *((self.saved.sizing, self.saved.size) if self.saved else ()))

    def expected(self, job: ImageJob) -> dict:
        predictor = self.predictor
        settings = {"prompts": [p.describe() for p in job.prompts], "multimask": self.args.multimask,
                    **({"hq_token_only": True} if self.args.hq_token_only else {}), **self._settings()}
        return {"model": model_identity(predictor.model), "sizing": predictor.sizing, "size": predictor.size,
                "settings": settings}

    def objects(self, report: dict) -> list[ExportObject]:
        return [ExportObject(coco_decode_rle(m["segmentation"]), label=m["label"], score=m["score"],
                             extra={"prompt": m["prompt"]}, group=m["prompt_index"]) for m in report["masks"]]

    def process(self, job: ImageJob, progress: Callable[[int, int], None] | None) -> ImageDone:
        laps = _Laps()
        image = load_image(job.path)
        height, width = image.shape[:2]
        laps("load")
        for prompt in job.prompts:
            prompt.check(width, height, job.path.name)
        if self.saved:
            if self.saved.geometry.original_size != (height, width):
                h, w = self.saved.geometry.original_size
                raise CliError(f"{self.args.tokens} was encoded from a {w}x{h} image, but {job.path} is "
                               f"{width}x{height}")
            load_image_tokens(self.predictor, self.args.tokens, image, image_name=str(job.path))
        else:
            self.predictor.set_image(image)
        laps("encode")
        report, objects, overlay = _segment(self.predictor, image, job.prompts, self.args.multimask, job.stem,
                                            self.exporter, self.args.hq_token_only)
        laps("decode")
        out_dir = self.out_dir
        with _replacing_outputs(out_dir, job.stem):
            files, entry = self.exporter.write(job.path, image, objects, stem=job.stem, file_name=job.name)
            _save_png(overlay, out_dir / report["overlay"])
            report["exports"] = [p.relative_to(out_dir).as_posix() for p in files]
            report["settings"] = self.expected(job)["settings"]
            _write_json({"image": str(job.path), **report}, out_dir / f"{job.stem}.json")
        laps("write")
        seconds = laps.total()
        written = [*files, out_dir / report["overlay"], out_dir / f"{job.stem}.json"]
        return ImageDone({"image": str(job.path), "files": [str(p) for p in written],
                          "scores": [m["score"] for m in report["masks"]], "seconds": seconds},
                         f"{len(objects)} masks in {seconds['total']:.1f} s -> {out_dir / report['overlay']}", entry)


class _EverythingWork(_MaskWork):
    command = "everything"

    def __init__(self, args: argparse.Namespace):
        super().__init__(args, _exporter(args))

    def setup(self) -> None:
        args = self.args
        self.model = sam_mlx.load(self.model_name)
        self.generator = sam_mlx.SamAutomaticMaskGenerator(
            self.model, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
            crop_n_layers=args.crop_n_layers, min_mask_region_area=args.min_mask_region_area,
            output_mode="uncompressed_rle", sizing=args.sizing or "original", size=args.size,
        )

    def expected(self, job: ImageJob) -> dict:
        args = self.args
        settings = {"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
                    "stability_score_thresh": args.stability_score_thresh, "crop_n_layers": args.crop_n_layers,
                    "min_mask_region_area": args.min_mask_region_area, "sizing": args.sizing or "original",
                    "size": args.size, **self._settings()}
        return {"model": model_identity(self.model), "settings": settings}

    def objects(self, report: dict) -> list[ExportObject]:
        return [_everything_object(coco_decode_rle(r["segmentation"]), r) for r in report["annotations"]]

    def process(self, job: ImageJob, progress: Callable[[int, int], None] | None) -> ImageDone:
        path, out_dir = job.path, self.out_dir
        laps = _Laps()
        image = load_image(path)
        laps("load")
        records = self.generator.generate(image, progress=progress)
        laps("generate")
        masks = [rle_to_mask(r["segmentation"]) for r in records]
        objects = [_everything_object(mask, r) for mask, r in zip(masks, records)]
        overlay = f"{job.stem}_overlay.png"
        annotations = [{**r, "segmentation": coco_encode_rle(r["segmentation"])} for r in records]
        height, width = image.shape[:2]
        expected = self.expected(job)
        with _replacing_outputs(out_dir, job.stem):
            files, entry = self.exporter.write(path, image, objects, stem=job.stem, file_name=job.name)
            _save_png(draw_overlay(image, masks), out_dir / overlay)
            _write_json(
                {"image": str(path), "width": width, "height": height, "model": expected["model"],
                 "overlay": overlay, "exports": [p.relative_to(out_dir).as_posix() for p in files],
                 "settings": expected["settings"], "annotations": annotations},
                out_dir / f"{job.stem}.json",
            )
        laps("write")
        seconds = laps.total()
        written = [*files, out_dir / overlay, out_dir / f"{job.stem}.json"]
        return ImageDone({"image": str(path), "files": [str(p) for p in written],
                          "scores": [r["predicted_iou"] for r in records], "seconds": seconds},
                         f"{len(records)} masks in {seconds['total']:.1f} s -> {out_dir / overlay}", entry)


def _everything_object(mask: np.ndarray, record: dict) -> ExportObject:
    return ExportObject(mask, score=record["predicted_iou"], stability_score=record["stability_score"],
                        extra={"point_coords": record["point_coords"], "crop_box": record["crop_box"]})


_OUTPUT_NAMES = {".": r".+\.(json|png|safetensors)", "yolo": r".+\.txt", "labelme": r".+\.json"}  # by folder


def _remove_temporaries(out_dir: Path) -> None:
    """Remove the temporaries that writers of outputs left when they were killed (a Ray worker, a run)."""
    for folder, names in _OUTPUT_NAMES.items():
        if (out_dir / folder).is_dir():
            remove_abandoned_temporaries(out_dir / folder, names)


def _run_here(
    work: ImageWork, jobs: Sequence[ImageJob], survive: bool
) -> Iterator[tuple[ImageJob, ImageDone | ImageFailed]]:
    """Each image's outcome, processed in this process one after the other (``work`` set up)."""
    for i, job in enumerate(jobs, 1):
        try:
            yield job, work(job, _ProgressBar(f"[{i}/{len(jobs)}] {job.path}"))
        except Exception as exc:
            if not survive:
                raise
            yield job, ImageFailed(_one_line(exc))


_RAY_OPTIONS = ("workers", "batch_size", "worker_cpus", "worker_gpus", "worker_resource", "worker_threads")


def _run_images(args: argparse.Namespace, work: ImageWork, jobs: Sequence[ImageJob]) -> int:
    """Process each image, here or on Ray workers (--ray); return the exit code.

    With several images and no --fail-fast, a failing image is reported and skipped: the others are
    written, the failures listed on stderr and in failures.json, and the exit code is 1. The run-level
    exports (COCO, YOLO classes) are written at the end, covering the images done.
    """
    count = len(jobs)
    given = [f"--{name.replace('_', '-')}" for name in _RAY_OPTIONS if getattr(args, name) is not None]
    if args.ray is None and given:
        raise CliError(f"{given[0]} goes with --ray")
    survive = count > 1 and not args.fail_fast
    if args.ray is None:
        _warn_if_slow_blas(work.command)
        work.setup()
        return _report(args, work, jobs, _run_here(work, jobs, survive), survive, sys.stdout)
    from .ray_data import RayOptions, run_jobs

    json_out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # Ray prints its workers' deaths on stdout: --json has it
        return _report(args, work, jobs, run_jobs(work, jobs, RayOptions.from_args(args)), survive, json_out)


def _report(args: argparse.Namespace, work: ImageWork, jobs: Sequence[ImageJob],
            outcomes: Iterator[tuple[ImageJob, ImageDone | ImageFailed]], survive: bool, json_out) -> int:
    """Report each outcome (stderr, --json lines on ``json_out``), write the run-level files; the exit code."""
    out_dir, count = work.out_dir, len(jobs)
    failures: list[dict] = []
    clear = "\r\033[K" if sys.stderr.isatty() else ""  # over a live progress bar
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out_dir)
    try:
        for i, (job, outcome) in enumerate(outcomes, 1):
            if isinstance(outcome, ImageFailed):
                if not survive:
                    raise CliError(outcome.error)
                failures.append({"image": str(job.path), "error": outcome.error})
                _log(f"{clear}[{i}/{count}] {job.path}: failed: {outcome.error}")
                _emit(args, failures[-1], json_out)
                continue
            if outcome.entry is not None:
                work.exporter.add_entry(outcome.entry)
            _log(f"{clear}[{i}/{count}] {job.path}: {outcome.message}")
            _emit(args, outcome.record, json_out)
    finally:
        run_files = work.exporter.close() if work.exporter is not None else []
        _remove_temporaries(out_dir)
    failures_file = out_dir / FAILURES_FILE
    if failures:
        _write_json({"failures": failures}, failures_file)
        run_files.append(failures_file)
        _log(f"sam-mlx {args.command}: {len(failures)} of {count} images failed (listed in {failures_file}):")
        for failure in failures:
            _log(f"  {failure['image']}: {failure['error']}")
    elif not getattr(args, "out", None):  # encode --out FILE writes no run files beside FILE
        failures_file.unlink(missing_ok=True)  # an earlier run's
    _emit(args, {"summary": {"images": count, "failed": len(failures), "files": [str(p) for p in run_files]}},
          json_out)
    return 1 if failures else 0


# ---------------------------------------------------------------- commands
def _segment_jobs(args: argparse.Namespace) -> list[ImageJob]:
    """The images and their prompts: from --prompts FILE, or the command line's prompt for every image."""
    if args.prompts:
        if args.images or args.point or args.bg_point or args.box or args.label:
            raise CliError("--prompts FILE gives the images and prompts: no IMAGE, --point, --bg-point, --box or "
                           "--label beside it")
        pairs = [(ImageInput(path, path.name), prompts) for path, prompts in read_prompts(args.prompts)]
    else:
        if not args.images:
            raise CliError("no image: give IMAGE|DIR ... or --prompts FILE")
        points = args.point + args.bg_point
        if not points and not args.box:
            raise CliError("no prompt: give at least one --point, --bg-point or --box")
        prompt = _prompt(points, [1] * len(args.point) + [0] * len(args.bg_point), args.box, args.label,
                         "the command line")
        pairs = [(image, [prompt]) for image in expand_images(args.images, args.recursive, Path(args.out_dir))]
    return _jobs([image for image, _ in pairs], [prompts for _, prompts in pairs])


def cmd_segment(args: argparse.Namespace) -> int:
    jobs = _segment_jobs(args)
    if args.tokens and len(jobs) != 1:
        raise CliError("--tokens goes with exactly one image (the one it was encoded from)")
    if args.tokens and args.ray is not None:
        raise CliError("--tokens goes with one image, encoded already: run it without --ray")
    labels = [p.label for job in jobs for p in job.prompts if p.label]
    return _run_images(args, _SegmentWork(args, list(dict.fromkeys(labels))), jobs)


_REPORT_KEYS = {"png": "file", "cutout": "cutout"}  # a mask's files in segment's JSON report


def segment_prompts(
    predictor: sam_mlx.SamPredictor, prompts: Sequence[Prompt], multimask: bool | None, hq_token_only: bool = False
) -> tuple[list[dict], list[ExportObject]]:
    """Decode the prompts on the predictor's image: a record per mask (prompt_index, mask_index, multimask,
    score, area, bbox, segmentation as COCO RLE, label, prompt) and the masks to export, in the same order.

    Every box of a prompt is one prompt (with all its points), all B decoded as one batch; no box is
    one prompt of points. ``multimask`` None: three candidates for a lone point, else one mask (HQ-SAM: always
    one, its HQ mask alone with ``hq_token_only``).
    """
    records, objects = [], []
    group = 0  # SAM's candidates for one prompt (one box) form a group: --best keeps its top one
    for prompt in prompts:
        points, labels, boxes = prompt.points, prompt.labels, prompt.boxes
        # A lone point is ambiguous (part or whole?): return SAM's three candidates unless told otherwise.
        several = multimask if multimask is not None else (len(points) == 1 and not len(boxes))
        n_prompts = max(len(boxes), 1)
        masks, scores, _ = predictor.predict_batch(
            np.broadcast_to(points, (n_prompts, *points.shape)) if len(points) else None,
            np.broadcast_to(labels, (n_prompts, len(labels))) if len(points) else None,
            boxes if len(boxes) else None,
            multimask_output=several,
            return_low_res=False,
            hq_token_only=hq_token_only,
        )  # masks: n_prompts x C x H x W
        for b in range(n_prompts):
            box = boxes[b].tolist() if len(boxes) else None
            described = {"points": points.tolist(), "labels": labels.tolist(), "box": box}
            for c in range(masks.shape[1]):
                mask = masks[b, c]
                records.append({"prompt_index": group, "mask_index": c, "multimask": several,
                                "score": float(scores[b, c]), **_mask_record(mask),
                                "segmentation": coco_encode_rle(mask_to_rle(mask[None])[0]),
                                "label": prompt.label, "prompt": described})
                objects.append(ExportObject(mask, label=prompt.label, score=float(scores[b, c]),
                                            extra={"prompt": described}, group=group))
            group += 1
    return records, objects


def _segment(
    predictor: sam_mlx.SamPredictor,
    image: np.ndarray,
    prompts: Sequence[Prompt],
    multimask: bool | None,
    stem: str,
    exporter: Exporter,
    hq_token_only: bool = False,
) -> tuple[dict, list[ExportObject], Image.Image]:
    """Decode the prompts on the predictor's image; return the JSON report, the masks to export and the overlay."""
    records, objects = segment_prompts(predictor, prompts, multimask, hq_token_only)
    chosen = set(exporter.selected(objects))
    records = [{**({_REPORT_KEYS[kind]: name for kind, name in exporter.object_files(stem, i).items()}
                   if i in chosen else {}), **record}  # --best: no files for the others
               for i, record in enumerate(records)]
    all_points = np.concatenate([p.points for p in prompts])
    all_labels = np.concatenate([p.labels for p in prompts])
    all_boxes = np.concatenate([p.boxes for p in prompts])
    height, width = image.shape[:2]
    report = {"width": width, "height": height, "model": model_identity(predictor.model), "sizing": predictor.sizing,
              "size": predictor.size, "overlay": f"{stem}_overlay.png", "masks": records}
    overlay = draw_overlay(image, [obj.mask for obj in objects], all_points, all_labels, all_boxes)
    return report, objects, overlay


def cmd_encode(args: argparse.Namespace) -> int:
    images = expand_images(args.images, args.recursive, None if args.out else Path(args.out_dir))
    if args.out and (len(images) != 1 or Path(args.images[0]).is_dir()):
        raise CliError("--out FILE takes one image: for folders or several images give --out-dir DIR "
                       f"(one STEM{TOKENS_SUFFIX} per image)")
    return _run_images(args, _EncodeWork(args), _jobs(images))


def cmd_convert(args: argparse.Namespace) -> None:
    source = Path(args.checkpoint).expanduser()
    # A local file is converted directly (no cache copy); names and repo ids go through the Hub cache.
    # float32, not the device's default (a half-precision encoder on a GPU): --dtype alone decides the precision.
    model = load_checkpoint(source, mx.float32) if source.is_file() else sam_mlx.load(args.checkpoint, mx.float32)
    out = Path(args.out).expanduser()
    if out.parent.is_dir():
        remove_abandoned_temporaries(out.parent, re.escape(out.name))  # those a killed convert left
    path = save_model(model, out, dtype=args.dtype, source=str(args.checkpoint))
    _log(f"{args.checkpoint}: {model.config.name} -> {path} ({args.dtype}, {path.stat().st_size / 1e6:.1f} MB)")
    _emit(args, {"checkpoint": str(args.checkpoint), "files": [str(path)], "dtype": args.dtype})


class _ProgressBar:
    """One self-overwriting status line on a terminal (the line of the outcome replaces it); nothing elsewhere."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width = label, width
        self.live = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.live:
            filled = self.width * done // max(total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            print(f"\r{self.label} [{bar}] {done}/{total} points", end="", file=sys.stderr, flush=True)


def cmd_everything(args: argparse.Namespace) -> int:
    images = expand_images(args.images, args.recursive, Path(args.out_dir))
    return _run_images(args, _EverythingWork(args), _jobs(images))


# A file's own dtype names (safetensors' and torch's storage classes) as numpy names.
_STORED_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                  "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
                  "BFloat16Storage": "bfloat16"}


def _stored_dtypes(path: Path) -> dict[str, int]:
    """How many tensors of each dtype a checkpoint file stores (read from its header, not its data)."""
    state, _ = read_state_dict(path)
    return _counts(_STORED_DTYPES.get(v.stored_type, v.stored_type) for v in state.values())


def _counts(names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def cmd_info(args: argparse.Namespace) -> None:
    from mlx.utils import tree_flatten

    from .ops.bands import band_count
    from .ops.blas import blas_description

    info: dict = {"sam_mlx": sam_mlx.__version__, "mlx": mx.__version__, "device": str(mx.default_device()),
                  "blas": blas_description(), "row_bands": band_count(), "model_cache": str(default_cache_dir())}
    lines = [f"sam_mlx {info['sam_mlx']}", f"mlx {info['mlx']} (default device: {info['device']})",
             f"BLAS: {info['blas']}",
             f"mask decoder: image tokens in {info['row_bands']} row band(s), one MLX stream each",
             f"model cache: {info['model_cache']}"]
    name = _model_name(args)
    if name:
        local = Path(name).expanduser()
        path = resolve_checkpoint(name)
        model = load_checkpoint(path)
        stored_in = local if local.is_file() else path
        stored = _stored_dtypes(stored_in)
        params = tree_flatten(model.parameters())
        dtypes = [(k.startswith("image_encoder."), str(v.dtype).removeprefix("mlx.core.")) for k, v in params]
        encoder = dict.fromkeys(dtype for in_encoder, dtype in dtypes if in_encoder)
        rest = dict.fromkeys(dtype for in_encoder, dtype in dtypes if not in_encoder)
        info["model"] = {"name": name, "identity": model_identity(model),
                         "parameters": sum(v.size for _, v in params), "stored_dtypes": stored,
                         "stored_in": str(stored_in),
                         "compute_dtypes": {"image_encoder": "+".join(encoder),
                                            "prompt_encoder_and_mask_decoder": "+".join(rest)},
                         "config": model.config.to_dict()}
        lines += [f"model: {name}: {info['model']['identity']}, {info['model']['parameters'] / 1e6:.1f} M parameters",
                  f"stored dtype: {', '.join(f'{k} ({n} tensors)' for k, n in stored.items())} in {stored_in}",
                  f"compute dtype: image encoder {'+'.join(encoder)}, prompt encoder and mask decoder {'+'.join(rest)}",
                  json.dumps(info["model"]["config"], indent=1)]
    if args.json:
        print(json.dumps(info))
    else:
        print("\n".join(lines))


def cmd_app(args: argparse.Namespace) -> None:
    try:
        from .app.library import Library
        from .app.server import serve
    except ModuleNotFoundError as exc:
        if exc.name not in ("starlette", "uvicorn"):
            raise
        raise CliError(f"the app needs {exc.name}: pip install 'sam-mlx[app]'") from None
    from .app.project import Project, ProjectError
    from .io.tokens import model_identity

    library = Library(args.images or ["."], args.out_dir)
    project_path = Path(args.project or Path(args.out_dir) / "sam-mlx.sqlite")
    project_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        project = Project(project_path)
    except ProjectError as exc:
        raise CliError(str(exc)) from None
    model = sam_mlx.load(_model_to_load(args))
    project.set_meta("model", json.dumps({"model": model_identity(model), "sizing": args.sizing or "original",
                                          "size": args.size}))
    serve(library, model, sizing=args.sizing or "original", size=args.size, port=args.port,
          open_browser=not args.no_browser, tokens_dir=args.tokens_dir, prefetch=args.prefetch, token=args.token,
          tokens_cache_bytes=args.tokens_cache_mb << 20, project=project,
          announce=(lambda info: print(json.dumps(info), flush=True)) if args.json else None)


def cmd_export(args: argparse.Namespace) -> None:
    """Write a project's objects from its stored masks (no model): the files the app's export writes."""
    from .app.project import Project, ProjectError
    from .app.project_export import export_project

    if not Path(args.project).is_file():
        raise CliError(f"{args.project}: no such project file")
    try:
        project = Project(args.project)
    except ProjectError as exc:
        raise CliError(str(exc)) from None
    with project:
        written = export_project(project, args.out_dir, args.export, args.simplify,
                                 log=lambda message: print(message, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"project": str(project.path), "out_dir": str(Path(args.out_dir).resolve()),
                          "files": [str(p) for p in written]}))
    print(f"sam-mlx export: {len(written)} files -> {args.out_dir}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The ``sam-mlx`` argument parser with its subcommands."""
    common = _Parser(add_help=False)
    # SUPPRESS: a subcommand's absent --debug / --json must not reset one given before the subcommand.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON object per image on stdout (files written, scores, timings)")
    model = _Parser(add_help=False)
    model.add_argument("--model", metavar="NAME|PATH", help=f"sam-vit-base|large|huge, mobile_sam, "
                       f"sam-hq-vit-base|large|huge|tiny, slimsam-50|77, medsam, a Hub repo id, "
                       f"or a checkpoint file (.pth / .safetensors); default: ${MODEL_ENV}")
    model.add_argument("--sizing", choices=("original", "stretch"),
                       help="original: longest side to SIZE, padded square (as Meta's SAM); "
                       "stretch: longest side to SIZE, sides rounded to multiples of 16, no padding "
                       "(default: original)")
    model.add_argument("--size", type=_positive_int, metavar="N", help="encoder input size (default: 1024)")
    outputs = _Parser(add_help=False)
    outputs.add_argument("--out-dir", default=".", metavar="DIR", help="output folder (default: current folder)")
    outputs.add_argument("--export", type=_formats, default=("png",), metavar="FORMAT[,FORMAT...]",
                         help=f"what to write besides the overlay and the JSON report: {', '.join(FORMATS)} "
                         "(default: png). png: a 0/255 PNG per mask; cutout: the image with the mask as alpha "
                         "(RGBA PNG); coco / coco-rle: one COCO instances file for the run (coco.json with "
                         "polygons, coco_rle.json with RLE); yolo: yolo/STEM.txt segmentation labels; labelme: "
                         "labelme/STEM.json. Polygons need OpenCV: pip install 'sam-mlx[export]'")
    outputs.add_argument("--simplify", type=_pixels, default=DEFAULT_SIMPLIFY, metavar="PIXELS",
                         help=f"polygon simplification tolerance (default: {DEFAULT_SIMPLIFY}; 0 keeps every corner)")
    outputs.add_argument("--best", action="store_true",
                         help="export only the top-scoring mask of each prompt (of each image for everything)")
    runs = _Parser(add_help=False)
    runs.add_argument("--recursive", action="store_true", help="take the images in subfolders of folders too")
    runs.add_argument("--fail-fast", action="store_true",
                      help="stop at the first image that fails (default: go on, list failures at the end "
                      f"and in {FAILURES_FILE}, exit code 1)")
    runs.add_argument("--resume", action="store_true",
                      help="skip the images whose outputs a run with the same model and settings completed: "
                      "segment and everything, its JSON report and every file it lists (the image is taken to be "
                      "unchanged); encode, its tokens file, made from the same pixels")
    ray = runs.add_argument_group("Ray", "run the images on Ray Data workers: pip install 'sam-mlx[ray]'. The "
                                  "outputs are those of a run without --ray. Workers find the images, the model and "
                                  "--out-dir at the command's paths (on a cluster: a shared file system)")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="alone: start a local Ray instance for the run; ADDRESS (host:port, ray://host:port or "
                     "auto): join that Ray cluster")
    ray.add_argument("--workers", type=_positive_int, metavar="N",
                     help="Ray workers, each loading the model once (default: as many as the cluster has room for, "
                     "at most one per image batch)")
    ray.add_argument("--batch-size", type=_positive_int, metavar="N",
                     help="images per task given to a worker; a retried task redoes its batch (default: 1)")
    ray.add_argument("--worker-cpus", type=_amount, metavar="C", help="CPUs each worker reserves (default: 1)")
    ray.add_argument("--worker-gpus", type=_amount, metavar="G",
                     help="GPUs each worker reserves (Linux with mlx[cuda]; default: 0)")
    ray.add_argument("--worker-resource", type=_resource, action="append", metavar="NAME=AMOUNT",
                     help="a custom Ray resource each worker reserves, e.g. mlx=1 for one worker per Mac whose "
                     "node was started with --resources='{\"mlx\": 1}' (repeatable)")
    ray.add_argument("--worker-threads", type=_positive_int, metavar="N",
                     help="MLX row bands and OpenBLAS threads of each worker on a CPU (default: its CPUs, at least 1)")

    parser = _Parser(prog="sam-mlx", description="Segment Anything (SAM v1) in MLX.")
    parser.add_argument("--version", action="version", version=f"sam-mlx {sam_mlx.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image on stdout")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    seg = commands.add_parser("segment", parents=[common, model, outputs, runs], help="masks for point and box prompts",
                              description="Segment images with point and box prompts (pixel coordinates; "
                              "write negative numbers as --box=-5,0,90,80), or with a prompts file giving each "
                              "image its own prompts. Writes per image an overlay PNG, a JSON of scores, areas, "
                              "bboxes and prompts, and the --export formats (default: one PNG per mask). A bbox "
                              "in that JSON is x, y, w, h with w = x2 - x1, h = y2 - y1 of the mask's first and "
                              "last pixel columns and rows (as Meta's SAM: one less than COCO's).")
    seg.add_argument("images", nargs="*", metavar="IMAGE|DIR", help="image files or folders of images")
    seg.add_argument("--point", type=_point, action="append", default=[], metavar="X,Y", help="foreground point")
    seg.add_argument("--bg-point", type=_point, action="append", default=[], metavar="X,Y", help="background point")
    seg.add_argument("--box", type=_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
                     help="box; several boxes are separate prompts decoded together, each with all the points")
    seg.add_argument("--label", metavar="NAME", help="the object's name in the exports (default: object)")
    seg.add_argument("--prompts", metavar="FILE",
                     help="JSON or CSV of prompts per image, instead of IMAGE and the prompt options: entries "
                     '{"image": PATH, "points": [[X, Y], ...], "labels": [1, 0, ...], "boxes": [[X1, Y1, X2, Y2], '
                     '...], "label": NAME}, or CSV columns image,points,labels,boxes,label (paths relative to FILE)')
    mode = seg.add_mutually_exclusive_group()
    mode.add_argument("--multimask", dest="multimask", action="store_const", const=True,
                      help="three candidate masks per prompt (default for a single point)")
    mode.add_argument("--single", dest="multimask", action="store_const", const=False,
                      help="one mask per prompt (default unless the prompt is a single point)")
    seg.add_argument("--hq-token-only", action="store_true",
                     help="HQ-SAM: the HQ token's mask alone (default: SAM's mask plus it, as the original)")
    seg.add_argument("--tokens", metavar="FILE", help="image tokens from `sam-mlx encode` to skip the encoder")
    seg.set_defaults(func=cmd_segment)

    enc = commands.add_parser("encode", parents=[common, model, runs], help="save images' tokens for later prompting",
                              description="Run the image encoder once per image and save the image tokens "
                              "(safetensors) for `sam-mlx segment --tokens` or "
                              "sam_mlx.load_image_tokens.")
    enc.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files or folders of images")
    where = enc.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="FILE", help="tokens file of a single image (.safetensors)")
    where.add_argument("--out-dir", default=".", metavar="DIR",
                       help=f"output folder: one STEM{TOKENS_SUFFIX} per image (default: current folder)")
    enc.set_defaults(func=cmd_encode)

    conv = commands.add_parser("convert", parents=[common], help="convert a checkpoint to sam_mlx safetensors",
                               description="Convert a Meta .pth, MobileSAM .pt, transformers safetensors, model "
                               "name or Hub repo id to a sam_mlx safetensors file.")
    conv.add_argument("checkpoint", metavar="CHECKPOINT")
    conv.add_argument("--out", required=True, metavar="FILE")
    conv.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    conv.set_defaults(func=cmd_convert)

    every = commands.add_parser("everything", parents=[common, model, outputs, runs],
                                help="masks for everything in images",
                                description="Segment everything with SAM's automatic mask generator (a grid of "
                                "point prompts, filtered and de-duplicated). Writes per image an overlay PNG of all "
                                "masks, a JSON of annotations as Meta's generator makes them (COCO RLE "
                                "segmentation, area, bbox, predicted_iou, stability_score, point_coords, crop_box) "
                                "and the --export formats (default: one PNG per mask). The bbox in that JSON is x, "
                                "y, w, h with w = x2 - x1, h = y2 - y1 of the mask's first and last pixel columns "
                                "and rows: one less than COCO's w, h (the coco export uses COCO's).")
    every.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files or folders of images")
    every.add_argument("--points-per-side", type=_positive_int, default=32, metavar="N",
                       help="N x N grid of point prompts (default: 32)")
    every.add_argument("--points-per-batch", type=_positive_int, default=64, metavar="N",
                       help="point prompts decoded together (default: 64)")
    every.add_argument("--pred-iou-thresh", type=_fraction, default=0.88, metavar="T",
                       help="keep masks whose predicted IoU exceeds T (default: 0.88)")
    every.add_argument("--stability-score-thresh", type=_fraction, default=0.95, metavar="T",
                       help="keep masks whose stability score is at least T (default: 0.95)")
    every.add_argument("--crop-n-layers", type=_count, default=0, metavar="N",
                       help="also run on N layers of zoomed-in crops (default: 0)")
    every.add_argument("--min-mask-region-area", type=_count, default=0, metavar="A",
                       help="fill holes and drop islands smaller than A pixels (default: 0)")
    every.set_defaults(func=cmd_everything)

    app = commands.add_parser("app", parents=[common, model], help="the local segmentation app in the browser",
                              description="Serve the segmentation app on 127.0.0.1 and open it in the browser: "
                              "hover, click and drag for masks, several objects per image, export. Other local "
                              "programs can use the same HTTP API (README). Needs the sam-mlx[app] extra.")
    app.add_argument("images", nargs="*", metavar="IMAGE|DIR", help="images or folders (default: this folder)")
    app.add_argument("--port", type=_count, default=8000, metavar="N", help="port on 127.0.0.1 (default: 8000; 0: any)")
    app.add_argument("--no-browser", action="store_true", help="do not open the browser")
    app.add_argument("--out-dir", default="sam-mlx-export", metavar="DIR",
                     help="export folder; the page exports into it or its sub-folders (default: sam-mlx-export)")
    app.add_argument("--project", metavar="FILE", help="the project file that keeps every image's objects and "
                     "prompts as they are made (SQLite; default: OUT_DIR/sam-mlx.sqlite)")
    app.add_argument("--tokens-dir", metavar="DIR", help="image tokens cache (default: the model cache's app_tokens)")
    app.add_argument("--tokens-cache-mb", type=_count, default=2048, metavar="MB",
                     help="the tokens folder's size limit: the tokens used longest ago are removed first "
                     "(default: 2048, about 500 images; each image's tokens take ~4 MB)")
    app.add_argument("--prefetch", type=_count, default=2, metavar="N",
                     help="images ahead to encode in the background (default: 2)")
    app.add_argument("--token", metavar="TOKEN", help="the API token (default: a new random one per run); "
                     "with --json the address, port and token are printed on stdout as one JSON object")
    app.set_defaults(func=cmd_app)

    export = commands.add_parser("export", parents=[common], help="export an app project's objects (no model)",
                                 description="Write the objects of a project of `sam-mlx app` (its SQLite file) from "
                                 "their stored masks, with the project's clean-up: the files the app's export "
                                 "writes, and a STEM.prompts.json per image.")
    export.add_argument("project", metavar="PROJECT", help="the project file (sam-mlx app's OUT_DIR/sam-mlx.sqlite)")
    export.add_argument("--export", type=_formats, default=("png",), metavar="FORMAT[,FORMAT...]",
                        help=f"formats: {', '.join(FORMATS)} (default: png)")
    export.add_argument("--out-dir", default=".", metavar="DIR", help="output folder (default: current folder)")
    export.add_argument("--simplify", type=_pixels, metavar="PIXELS",
                        help="polygon simplification tolerance (default: the project's setting)")
    export.set_defaults(func=cmd_export)

    info = commands.add_parser("info", parents=[common], help="versions, device, BLAS and a model's config",
                               description="Show the sam_mlx and MLX versions, the default device, the BLAS "
                               f"in use, the model cache and, with --model or ${MODEL_ENV}, the model's config, "
                               "the dtypes its file stores and the dtypes it computes in.")
    info.add_argument("--model", metavar="NAME|PATH", help=f"a model to load and describe (default: ${MODEL_ENV})")
    info.set_defaults(func=cmd_info)
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CliError, ValueError, OSError, HubError, ImportError)):  # CheckpointError is a ValueError
        return text
    return f"{type(exc).__name__}: {text} (unexpected: run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sam-mlx`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():  # warnings as one line too, restored on return
            warnings.showwarning = lambda message, *_, **__: _log(f"sam-mlx {args.command}: warning: {message}")
            code = args.func(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            raise
        _log("sam-mlx: interrupted")
        return 130
    except Exception as exc:
        if args.debug:
            raise
        _log(f"sam-mlx {args.command}: error: {_one_line(exc)}")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
