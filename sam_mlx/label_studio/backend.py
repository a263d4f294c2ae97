"""The model side of the Label Studio backend: images encoded once, prompts decoded, masks as brush results.

All MLX work runs on one thread of its own (MLX streams live in the thread that made them, and two requests
computing at once on two cores gain nothing); fetching images and encoding RLE run on the server's threads.
Encoded images keep their predictor in memory (the last ``keep_images``) and their tokens on disk in
``tokens_dir``, named as ``sam-mlx app`` names them (the image file's digest, the model, the sizing), so the app
and this backend share one encodings cache, kept under ``tokens_cache_bytes``.

Refining: the last decode of each image is kept with its prompt; a request whose points include the last one's
and whose box is the same (the user added a point to the same object) gets the last mask's low-res logits as its
hint, as the app does.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .. import SamAutomaticMaskGenerator, SamPredictor, __version__
from ..io.cache import trim_tokens_cache
from ..io.images import decode_image_bytes
from ..io.tokens import ImageTokensError, load_image_tokens, model_fingerprint, save_image_tokens
from .config import LabelConfig, parse_label_config
from .images import ImageSource
from .prompts import Click, parse_click
from .rle import encode_brush


@dataclass
class _Refinement:
    """The last decode of an image: its prompt (pixels) and the chosen mask's 1 x h x w low-res logits."""

    points: set[tuple[float, float, int]]
    box: tuple[float, ...] | None
    low_res: np.ndarray


class SamBackend:
    """Answers Label Studio's ``/predict`` requests with SAM masks (see the module's docstring)."""

    def __init__(self, model, images: ImageSource, tokens_dir: Path, sizing: str = "original",
                 size: int | tuple[int, int] | None = None, keep_images: int = 6, tokens_cache_bytes: int = 2 << 30,
                 segment_everything: bool = False, everything_points: int = 32,
                 log: Callable[[str], None] = lambda message: None):
        self.model = model
        self.images = images
        self.tokens_dir = Path(tokens_dir)
        self.sizing = sizing
        self.size = SamPredictor(model, sizing=sizing, size=size).size  # checked, and the default filled in
        self.keep_images = keep_images
        self.tokens_cache_bytes = tokens_cache_bytes
        self.segment_everything = segment_everything
        self.everything_points = everything_points
        self.log = log
        self.fingerprint = model_fingerprint(model)
        self.model_version = f"sam-mlx-{__version__}-{model.config.name}-{self.fingerprint[:8]}"
        self.configs: dict[str, LabelConfig] = {}  # by project id, from /setup (predict requests carry theirs too)
        self._mlx = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-mlx-label-studio")
        self._warmups = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-mlx-label-studio-warmup")
        self._lock = threading.Lock()
        self._predictors: OrderedDict[str, SamPredictor] = OrderedDict()  # by image digest
        self._digests: OrderedDict[str, str] = OrderedDict()  # image reference -> digest of its bytes
        self._refinements: OrderedDict[str, _Refinement] = OrderedDict()  # by image digest

    # ---------------------------------------------------------------- the protocol's requests
    def setup(self, project: str, label_config: str) -> dict:
        """Parse and keep a project's labelling config -> the model version and what it will read and write."""
        config = parse_label_config(label_config)
        with self._lock:
            self.configs[_project_id(project)] = config
        return {"model_version": self.model_version, **config.describe()}

    def predict(self, body: dict) -> dict:
        """A ``/predict`` body -> ``{"results": [...]}``: one prediction for an interactive request (``context``),
        else one per task when segmenting everything, else none (the tasks' images are encoded for later)."""
        tasks = body.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise ValueError("'tasks' must be a list of task objects")
        label_config = body.get("label_config")
        if label_config is not None:
            config = parse_label_config(label_config)
        else:
            with self._lock:
                config = self.configs.get(_project_id(body.get("project")))
            if config is None:
                raise ValueError("no label_config in the request and no /setup for this project")
        params = body.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        if context:
            if len(tasks) != 1:
                raise ValueError(f"an interactive request must carry one task, got {len(tasks)}")
            return {"results": [self.predict_click(tasks[0], parse_click(context, config), config)]}
        if self.segment_everything:
            return {"results": [self.predict_everything(task, config) for task in tasks]}
        for task in tasks:  # Label Studio asks when a task opens: its image is encoded before the first click
            self._warmups.submit(self._warm_up, task, config)
        return {"results": []}

    def predict_click(self, task: dict, click: Click, config: LabelConfig) -> dict:
        """One interactive prediction: the clicked object's mask as one ``brushlabels`` result."""
        brush = config.brush_for(click.image_name)
        label = click.label if click.label in brush.labels or not brush.labels else brush.labels[0]
        reference, task_id = self._image_reference(task, config, click.image_name)
        predictor, digest = self._predictor(reference, task_id)
        height, width = predictor.original_size
        points, labels, box = click.in_pixels(width, height)
        mask, score = self._submit(lambda: self._decode(predictor, digest, points, labels, box)).result()
        result = self._brush_result(mask, score, brush.name, click.image_name, label)
        return {"result": [result], "score": score, "model_version": self.model_version}

    def segment(self, data: bytes, name: str, points: np.ndarray | None, labels: np.ndarray | None,
                box: np.ndarray | None) -> tuple[np.ndarray, float]:
        """A prompt (image pixels) on an image given as file bytes -> (mask H x W, predicted IoU), with the same
        encodings cache and refinement hints as Label Studio's clicks (X-AnyLabeling's requests)."""
        digest = hashlib.sha256(data).hexdigest()[:32]
        predictor = self._submit(lambda: self._open(digest, data, name, None)).result()
        return self._submit(lambda: self._decode(predictor, digest, points, labels, box)).result()

    def predict_everything(self, task: dict, config: LabelConfig) -> dict:
        """Pre-annotation: every mask of segment everything as a ``brushlabels`` result with the first label."""
        name = _brushed_image(config)
        brush = config.brush_for(name)
        reference, task_id = self._image_reference(task, config, name)
        image = decode_image_bytes(self.images.fetch(reference, task_id), reference)
        generator = SamAutomaticMaskGenerator(self.model, points_per_side=self.everything_points, sizing=self.sizing,
                                              size=self.size)
        records = self._submit(lambda: generator.generate(image)).result()
        label = brush.labels[0] if brush.labels else None
        results = [self._brush_result(r["segmentation"], float(r["predicted_iou"]), brush.name, name, label)
                   for r in records]
        score = float(np.mean([r["score"] for r in results])) if results else 0.0
        return {"result": results, "score": round(score, 5), "model_version": self.model_version}

    def close(self) -> None:
        self._warmups.shutdown(wait=True, cancel_futures=True)
        self._mlx.shutdown(wait=True, cancel_futures=True)

    def _warm_up(self, task: dict, config: LabelConfig) -> None:
        """Encode a task's image ahead of its first click; a failure is logged (the click will report it)."""
        try:
            self._predictor(*self._image_reference(task, config, _brushed_image(config)))
        except Exception as exc:  # noqa: BLE001 - nobody waits for this: the message goes to the log
            self.log(f"sam-mlx label-studio: cannot encode task {task.get('id')}'s image: {exc}")

    # ---------------------------------------------------------------- images
    @staticmethod
    def _image_reference(task: dict, config: LabelConfig, image_name: str) -> tuple[str, int | None]:
        data = task.get("data")
        key = config.images[image_name]
        if not isinstance(data, dict) or key not in data:
            raise ValueError(f"the task has no data.{key} (the image of <Image name={image_name!r} value=\"${key}\">)")
        task_id = task.get("id")
        return data[key], task_id if isinstance(task_id, int) else None

    def _reference_key(self, reference: str) -> str:
        """The cache key of an image reference: a local file's also names its size and time, so edits are seen."""
        root = self.images.document_root
        parts = urlsplit(reference)
        if root is not None and parts.path.rstrip("/") == "/data/local-files" and not parts.scheme:
            given = parse_qs(parts.query).get("d", [""])[-1]
            try:
                stat = (root / given.lstrip("/")).stat()
            except OSError:
                return reference
            return f"{reference}|{stat.st_size}|{stat.st_mtime_ns}"
        return reference

    def _predictor(self, reference: str, task_id: int | None) -> tuple[SamPredictor, str]:
        """The image's predictor and digest: from memory, from a tokens file, or fetched and encoded (MLX thread)."""
        key = self._reference_key(reference)
        with self._lock:
            digest = self._digests.get(key)
            if digest is not None and digest in self._predictors:
                self._predictors.move_to_end(digest)
                return self._predictors[digest], digest
        data = None
        if digest is None or not self._tokens_path(digest).is_file():
            data = self.images.fetch(reference, task_id)
            digest = hashlib.sha256(data).hexdigest()[:32]
        predictor = self._submit(lambda: self._open(digest, data, reference, task_id)).result()
        with self._lock:
            self._digests[key] = digest
            self._digests.move_to_end(key)
            while len(self._digests) > 4096:
                self._digests.popitem(last=False)
        return predictor, digest

    def _tokens_path(self, digest: str) -> Path:
        size = "x".join(map(str, self.size)) if isinstance(self.size, tuple) else self.size
        return self.tokens_dir / f"{digest}-{self.fingerprint}-{self.sizing}-{size}.safetensors"

    def _open(self, digest: str, data: bytes | None, reference: str, task_id: int | None) -> SamPredictor:
        """(MLX thread.) The image's predictor, kept in memory: already there (a warm-up of the same image came
        first), else set from its tokens file, else the image encoded and its tokens saved."""
        with self._lock:
            if digest in self._predictors:
                self._predictors.move_to_end(digest)
                return self._predictors[digest]
        predictor = self._set_image(digest, data, reference, task_id)
        with self._lock:
            self._predictors[digest] = predictor
            while len(self._predictors) > self.keep_images:
                self._predictors.popitem(last=False)
        return predictor

    def _set_image(self, digest: str, data: bytes | None, reference: str, task_id: int | None) -> SamPredictor:
        """(MLX thread.) A new predictor set to the image: its tokens file if usable, else the image encoded."""
        predictor = SamPredictor(self.model, sizing=self.sizing, size=self.size)
        path = self._tokens_path(digest)
        on_disk = not self.model.config.hq  # a tokens file cannot hold HQ-SAM's early features
        if on_disk and path.is_file():
            try:
                load_image_tokens(predictor, path)
                os.utime(path)  # used now: the last to be removed from a full cache
                return predictor
            except (ImageTokensError, ValueError):
                pass  # damaged or made otherwise: encoded again and overwritten
        if data is None:
            data = self.images.fetch(reference, task_id)
        start = time.perf_counter()
        predictor.set_image(decode_image_bytes(data, reference))
        self.log(f"sam-mlx label-studio: encoded {reference} in {time.perf_counter() - start:.1f} s")
        if on_disk:
            self.tokens_dir.mkdir(parents=True, exist_ok=True)
            save_image_tokens(predictor, path, image_name=reference)
            trim_tokens_cache(self.tokens_dir, path, self.tokens_cache_bytes)
        return predictor

    # ---------------------------------------------------------------- decoding
    def _decode(self, predictor: SamPredictor, digest: str, points: np.ndarray | None, labels: np.ndarray | None,
                box: np.ndarray | None) -> tuple[np.ndarray, float]:
        """(MLX thread.) The mask (H x W bool) and predicted IoU of a prompt: three candidates for a lone point
        (the best kept), else one; the last mask of the same object as hint."""
        prompt = set() if points is None else {(float(x), float(y), int(lab)) for (x, y), lab in zip(points, labels)}
        box_key = tuple(map(float, box)) if box is not None else None
        with self._lock:
            last = self._refinements.get(digest)
        refining = last is not None and last.box == box_key and last.points < prompt
        hint = last.low_res if refining else None
        multimask = hint is None and box is None and len(prompt) == 1
        masks, scores, low_res = predictor.predict(points, labels, box, hint, multimask)
        best = int(np.argmax(scores))
        with self._lock:
            self._refinements[digest] = _Refinement(prompt, box_key, low_res[[best]])
            self._refinements.move_to_end(digest)
            while len(self._refinements) > self.keep_images:
                self._refinements.popitem(last=False)
        return masks[best], float(scores[best])

    def _submit(self, work: Callable):
        return self._mlx.submit(work)

    def _brush_result(self, mask: np.ndarray, score: float, from_name: str, to_name: str, label: str | None) -> dict:
        height, width = mask.shape
        value = {"format": "rle", "rle": encode_brush(mask), "brushlabels": [label] if label is not None else []}
        return {"id": uuid.uuid4().hex[:10], "from_name": from_name, "to_name": to_name, "type": "brushlabels",
                "original_width": width, "original_height": height, "image_rotation": 0, "value": value,
                "score": round(score, 5), "readonly": False}


def _project_id(project) -> str:
    """Label Studio names a project "<id>.<creation timestamp>"; the id part."""
    return str(project).split(".", 1)[0]


def _brushed_image(config: LabelConfig) -> str:
    """The first image of the config that a BrushLabels tag labels (``parse_label_config`` checks there is one)."""
    return next(n for n in config.images if any(c.kind == "brushlabels" and c.to_name == n for c in config.controls))
