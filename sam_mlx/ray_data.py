"""Image collections on Ray Data: the command's folder runs on Ray workers, and ``map_batches`` classes.

``sam-mlx encode|everything|segment ... --ray [ADDRESS]`` hands ``run_jobs`` the command's ``ImageWork`` and
its images: one Ray Data actor per worker unpickles the work, loads the model once (``ImageWork.setup``) and
calls it image by image, so every file is written by the same code as without Ray, under the same names.
Rows come back in the images' order (Ray Data's ``preserve_order``): the command reports them, numbers the
run-level exports (COCO) and writes failures.json as a run without Ray does. An image that fails is an
``ImageFailed`` row; a worker that dies (killed, out of memory) is restarted by Ray and its task retried
``RayOptions.retries`` times, after which its images are reported as failed and the others go on.

For pipelines of one's own, ``EncodeImages``, ``SegmentEverything`` and ``SegmentPrompts`` are callable
classes for ``ray.data.Dataset.map_batches``: each loads the model once per worker and maps rows with an
``image`` (H x W x C uint8, as ``ray.data.read_images`` gives) or a ``path`` to rows with the results
and an ``error`` column ("" or why that row's image failed); the other columns are kept, but ``image``::

    images = ray.data.read_images("photos", mode="RGB", include_paths=True)
    tokens = images.map_batches(EncodeImages, fn_constructor_kwargs={"model": "mobile_sam.pt"},
                                compute=ray.data.ActorPoolStrategy(size=2), batch_size=4)
    tokens.write_parquet("tokens")

Ray is imported only by ``run_jobs`` and ``connect`` (the ``sam-mlx[ray]`` extra); the classes run without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

import sam_mlx

from .cli.jobs import ImageDone, ImageFailed, ImageJob, ImageWork
from .cli.messages import CliError, _one_line
from .cli.prompts import _prompt
from .cli.work import segment_prompts
from .io.images import load_image, pil_to_rgb
from .io.tokens import ImageTokensError, model_fingerprint, model_identity
from .ops import blas
from .transforms import ImageGeometry, image_geometry


@dataclass
class RayOptions:
    """Where and how wide a command's Ray run goes.

    ``address``: "local" starts a Ray instance for the run, else a cluster's address (``host:port``,
    ``ray://host:port``, ``auto``); a Ray already initialised in the process is used as it is. ``workers``:
    default as many as the cluster has room for at ``cpus``/``gpus``/``resources`` each, at most one per
    batch. ``threads``: MLX row bands and OpenBLAS threads of a worker on a CPU (default: its CPUs).
    """

    address: str = "local"
    workers: int | None = None
    batch_size: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    retries: int = 3  # a task whose worker died is run again this many times

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RayOptions:
        given = {"workers": args.workers, "batch_size": args.batch_size, "cpus": args.worker_cpus,
                 "gpus": args.worker_gpus, "threads": args.worker_threads,
                 "resources": dict(args.worker_resource) if args.worker_resource else None}
        return cls(address=args.ray, **{key: value for key, value in given.items() if value is not None})


def connect(address: str = "local") -> None:
    """Start or join Ray (once per process), quietly: results and errors reach the caller, not Ray's logs."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray Data ({exc}): pip install 'sam-mlx[ray]'") from None
    import ray.data

    if not ray.is_initialized():
        local = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR, **local)
    for handler in logging.getLogger("ray.data").handlers:  # its run's INFO lines on stderr; its log file stays
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.ERROR)


def worker_room(options: RayOptions) -> int:
    """How many workers of ``options`` the connected cluster holds, or a CliError naming what it lacks."""
    import ray

    total = ray.cluster_resources()
    wanted = {"CPU": options.cpus, "GPU": options.gpus, **options.resources}
    room = min((math.floor(total.get(name, 0.0) / amount + 1e-9) for name, amount in wanted.items() if amount > 0),
               default=len(ray.nodes()))
    if room < 1:
        raise CliError(f"the Ray cluster has no room for a worker that reserves {_describe(wanted)}: it has "
                       f"{_describe(total)}")
    if options.workers is not None and options.workers > room:  # Ray Data would wait for room for ever
        raise CliError(f"--workers {options.workers}: the Ray cluster has room for {room} workers that reserve "
                       f"{_describe(wanted)} ({_describe(total)})")
    return room


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0 and ":" not in name)


def run_jobs(work: ImageWork, jobs: Sequence[ImageJob],
             options: RayOptions) -> Iterator[tuple[ImageJob, ImageDone | ImageFailed]]:
    """Start the jobs on Ray Data workers; return an iterator of each job's outcome, in the jobs' order."""
    import ray

    started_here = not ray.is_initialized()
    connect(options.address)
    try:
        dataset = _dataset(work, jobs, options)
    except BaseException:
        if started_here:
            ray.shutdown()
        raise

    def outcomes() -> Iterator[tuple[ImageJob, ImageDone | ImageFailed]]:
        lost = ImageFailed(f"not processed: its Ray worker died {options.retries + 1} times (killed, out of "
                           "memory or crashed)")
        done = 0
        try:
            for row in dataset.iter_rows():
                for missing in range(done, int(row["index"])):
                    yield jobs[missing], lost
                yield jobs[int(row["index"])], pickle.loads(row["outcome"])
                done = int(row["index"]) + 1
            for missing in range(done, len(jobs)):
                yield jobs[missing], lost
        except ray.exceptions.RayError as exc:
            raise CliError(f"the Ray job failed: {_one_line(exc)[:500]}") from exc
        finally:
            if started_here:  # Ray's own messages end with it, before the command's
                ray.shutdown()

    return outcomes()


def _dataset(work: ImageWork, jobs: Sequence[ImageJob], options: RayOptions):
    """The jobs as a Ray Dataset mapped by ``_CommandWorker`` actors (lazy: nothing runs until it is read)."""
    import ray

    batches = math.ceil(len(jobs) / options.batch_size)
    room = worker_room(options)  # checks --workers too
    workers = min(options.workers or room, batches)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows in the jobs' order, as a run without Ray
    context.enable_progress_bars = False  # the command prints a line per image
    context.max_errored_blocks = -1  # a batch that failed every retry is reported, the others go on
    rows = [{"index": i, "job": pickle.dumps(job)} for i, job in enumerate(jobs)]
    threads = options.threads or max(1, int(options.cpus))
    with warnings.catch_warnings():  # max_task_retries has no named parameter (yet): "ray_remote_args is deprecated"
        warnings.simplefilter("ignore", DeprecationWarning)
        dataset = ray.data.from_items(rows, override_num_blocks=batches).map_batches(
            _CommandWorker, fn_constructor_kwargs={"work": work, "folder": os.getcwd(), "threads": threads},
            batch_size=options.batch_size, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=options.cpus, num_gpus=options.gpus or None, resources=options.resources or None,
            max_task_retries=options.retries,
        )
    return dataset


class _CommandWorker:
    """A Ray Data actor that runs a command's ImageWork: set up once, then image by image.

    It works in the command's folder, so that relative paths (images, --out-dir, the model) mean what they
    mean to the command. An image's error is its outcome; the batch goes on.
    """

    def __init__(self, work: ImageWork, folder: str, threads: int):
        use_threads(threads)
        try:
            os.chdir(folder)
        except OSError:
            raise CliError(f"the command's folder {folder} is not on this Ray node: workers need the images, the "
                           "model and --out-dir at the command's paths (a shared file system)") from None
        work.setup()
        self.work = work

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = []
        for blob in batch["job"]:
            try:
                outcome = self.work(pickle.loads(blob))
            except Exception as exc:
                outcome = ImageFailed(_one_line(exc))
            outcomes.append(pickle.dumps(outcome))
        return {"index": batch["index"], "outcome": _column(outcomes)}


def use_threads(threads: int | None = None) -> None:
    """This process's MLX row bands and OpenBLAS threads (on a CPU): ``threads``, default the CPUs Ray
    reserved for this worker; outside Ray without ``threads``, nothing changes."""
    if threads is None:
        try:
            import ray

            if ray.is_initialized():
                threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        except ImportError:
            pass
    if threads is not None:
        os.environ["SAM_MLX_BANDS"] = str(threads)
        blas.set_threads(threads)


# ---------------------------------------------------------------- map_batches classes
def _row_image(row: dict[str, Any]) -> np.ndarray:
    """A row's image as H x W x 3 uint8 RGB: its ``image`` (any channels) or else the file at its ``path``."""
    image = row.get("image")
    if image is not None:
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return image
        return pil_to_rgb(Image.fromarray(image))
    if row.get("path") is not None:
        return load_image(str(row["path"]))
    raise ValueError("a row needs an image column (H x W x 3 uint8, as ray.data.read_images gives) or a path column")


def _column(values: list) -> np.ndarray:
    """Values of one column as a batch's numpy column: arrays of one shape stacked, other arrays as objects."""
    if values and all(isinstance(v, np.ndarray) for v in values):
        if len({(v.shape, v.dtype) for v in values}) == 1:
            return np.stack(values)
        column = np.empty(len(values), dtype=object)
        for i, value in enumerate(values):
            column[i] = value
        return column
    if values and all(isinstance(v, bytes) for v in values):
        return np.array(values, dtype=object)
    return np.array(values)


def _plain(value: Any) -> Any:
    """A batch cell as Python lists and numbers (Ray gives a row's lists as numpy arrays, nested ones as objects)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.dtype == object else value.tolist()
    return value.item() if isinstance(value, np.generic) else value


class _RowMapper:
    """The map_batches classes' frame: a row out per row in, the inputs' columns kept but ``image``, and ``error``
    ("" or why the row's image failed; its result columns then hold ``failed`` values)."""

    def __init__(self, model: str, threads: int | None):
        use_threads(threads)
        self.model = sam_mlx.load(model)

    def results(self, image: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def failed(self) -> dict[str, Any]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(next(iter(batch.values())))
        rows = []
        for i in range(count):
            row = {key: values[i] for key, values in batch.items()}
            try:
                rows.append({**self.results(_row_image(row), row), "error": ""})
            except Exception as exc:
                rows.append({**self.failed(), "error": _one_line(exc)})
        out = {key: values for key, values in batch.items() if key != "image"}
        for key in (rows[0] if rows else {**self.failed(), "error": ""}):
            out[key] = _column([row[key] for row in rows])
        return out


class EncodeImages(_RowMapper):
    """``map_batches`` class: each image's tokens.

    Adds ``tokens`` (h x w x C float32: the predictor's 1 x h x w x C features), ``original_size``,
    ``input_size`` and ``padded_size`` (H, W) and ``model`` (the model's fingerprint): what
    ``set_image_from_row`` needs to prompt the image later without the encoder. ``model`` is a name or a
    checkpoint path, loaded once per worker; ``sizing``/``size`` as ``SamPredictor``'s; ``threads`` as
    ``use_threads``.
    """

    def __init__(self, model: str, sizing: str = "original", size: int | tuple[int, int] | None = None,
                 threads: int | None = None):
        super().__init__(model, threads)
        self.predictor = sam_mlx.SamPredictor(self.model, sizing=sizing, size=size)
        self.fingerprint = model_fingerprint(self.model)

    def results(self, image: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
        self.predictor.set_image(image)
        geometry = self.predictor.geometry
        return {"tokens": np.array(self.predictor.features[0].astype(mx.float32)),
                "original_size": np.array(geometry.original_size), "input_size": np.array(geometry.input_size),
                "padded_size": np.array(geometry.padded_size), "model": self.fingerprint}

    def failed(self) -> dict[str, Any]:
        none = np.zeros(2, dtype=np.int64)
        return {"tokens": np.zeros((0, 0, 0), np.float32), "original_size": none, "input_size": none,
                "padded_size": none, "model": self.fingerprint}


def set_image_from_row(predictor: sam_mlx.SamPredictor, row: dict[str, Any]) -> None:
    """Set the predictor's image from an ``EncodeImages`` row, as ``load_image_tokens`` does from a file:
    refused (``ImageTokensError``) if the row failed or was made by another model or sizing."""
    if row.get("error"):
        raise ImageTokensError(f"the row's image failed to encode: {row['error']}")
    if row["model"] != model_fingerprint(predictor.model):
        raise ImageTokensError(f"the row's tokens were made by a model with fingerprint {row['model']}, but this "
                               f"predictor's model is {model_identity(predictor.model)}")
    original, input_size, padded = (tuple(int(v) for v in row[key]) for key in
                                    ("original_size", "input_size", "padded_size"))
    geometry = ImageGeometry(original, input_size, padded)
    if image_geometry(original, predictor.sizing, predictor.size) != geometry:
        raise ImageTokensError(f"the row's tokens were made with another sizing than this predictor's "
                               f"({predictor.sizing!r} at size {predictor.size})")
    predictor.set_image_tokens(mx.array(np.asarray(row["tokens"], dtype=np.float32))[None], geometry)


class SegmentEverything(_RowMapper):
    """``map_batches`` class: every object of each image (the automatic mask generator).

    Adds ``annotations`` (JSON text: the list of COCO RLE records that ``sam-mlx everything`` writes, with
    segmentation, area, bbox, predicted_iou, point_coords, stability_score, crop_box), ``width`` and ``height``.
    ``generator`` holds ``SamAutomaticMaskGenerator``'s keyword arguments (points_per_side, sizing, ...).
    """

    def __init__(self, model: str, threads: int | None = None, **generator: Any):
        super().__init__(model, threads)
        self.generator = sam_mlx.SamAutomaticMaskGenerator(self.model, **{**generator, "output_mode": "coco_rle"})

    def results(self, image: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
        height, width = image.shape[:2]
        return {"annotations": json.dumps(self.generator.generate(image)), "width": width, "height": height}

    def failed(self) -> dict[str, Any]:
        return {"annotations": "[]", "width": 0, "height": 0}


class SegmentPrompts(_RowMapper):
    """``map_batches`` class: the masks of each row's own prompt.

    A row's ``points`` ([[x, y], ...]), ``labels`` (1 foreground, 0 background; default all 1), ``boxes``
    ([[x1, y1, x2, y2], ...]: each box one prompt with all the points) and ``label`` (the object's name) are
    columns, any of them absent or empty. Adds ``masks`` (JSON text: the records of ``sam-mlx segment``'s
    report with each mask as COCO RLE ``segmentation``), ``width`` and ``height``. ``multimask`` as the
    command's: None gives three candidates for a lone point, else one mask per prompt.
    """

    def __init__(self, model: str, sizing: str = "original", size: int | tuple[int, int] | None = None,
                 multimask: bool | None = None, threads: int | None = None):
        super().__init__(model, threads)
        self.predictor = sam_mlx.SamPredictor(self.model, sizing=sizing, size=size)
        self.multimask = multimask

    def results(self, image: np.ndarray, row: dict[str, Any]) -> dict[str, Any]:
        where = f"row {_plain(row.get('path', ''))}".strip()
        prompt = _prompt(*(_plain(row.get(key)) for key in ("points", "labels", "boxes", "label")), where)
        height, width = image.shape[:2]
        prompt.check(width, height, where)
        self.predictor.set_image(image)
        records, _ = segment_prompts(self.predictor, [prompt], self.multimask)
        return {"masks": json.dumps(records), "width": width, "height": height}

    def failed(self) -> dict[str, Any]:
        return {"masks": "[]", "width": 0, "height": 0}
