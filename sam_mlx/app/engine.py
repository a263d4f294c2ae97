"""The app's inference engine: the MLX work of the app, on two threads.

The interactive thread (the one that calls ``Engine.run``: the main thread of ``sam-mlx app``) decodes; the
encoder thread (started by ``run``) encodes images. So a click is answered while an image ahead of the user is
encoded in the background, and no two requests compute at once on one thread: two cores (or one GPU) gain nothing
from that. The server's threads hand work over through ``decode``, ``replay``, ``hover`` and ``focus`` and wait
on the futures they return.

The interactive thread takes decodes (clicks, boxes, exports: each one answered, first come first served), then
hovers: the latest position of each hover stream only; a position not started when a newer one arrives is dropped
(its future cancelled), never queued. A decode for an image not encoded yet waits in the queue for its encode,
while decodes of images that are ready pass it.

The encoder thread takes the image the user looks at (``focus``), then the next images ahead (``prefetch``) once
interactive work has paused for ``idle_seconds``. Encoded images keep their predictor in memory (the last
``keep_images``) and their tokens on disk in ``tokens_dir`` (``sam_mlx.io.tokens`` files, named by the image
file's content, the model and the sizing), so an image encoded once, in this run or an earlier one, opens without
the encoder. The folder is kept under ``tokens_cache_bytes``: the files used longest ago go first (a file's
modification time is its last use); files of other names in the folder are never touched.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import mlx.core as mx
import numpy as np

from .. import SamPredictor
from ..fast import FastSam
from ..io.cache import trim_tokens_cache
from ..io.images import load_image
from ..io.tokens import ImageTokensError, load_image_tokens, model_fingerprint, save_image_tokens
from ..transforms import MASK_THRESHOLD
from .library import ImageEntry, Library
from .masks import encode_masks


class HintExpired(KeyError):
    """A mask hint that refers to a result the engine no longer keeps."""


class EngineStopped(RuntimeError):
    """Work asked of an engine that is stopping: it will not run."""


@dataclass(frozen=True)
class Prompt:
    """One decode request in image pixels. ``hint``: (result id, candidate) or C x h x w low-res logits."""

    points: np.ndarray | None  # N x 2 (x, y)
    labels: np.ndarray | None  # N: 1 foreground, 0 background
    box: np.ndarray | None  # 4: x1, y1, x2, y2
    hint: tuple[str, int] | np.ndarray | None
    multimask: bool


class HintStore:
    """The low-res logits of recent decodes (C x h x w float32 each), by result id, within a memory budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._results: OrderedDict[str, tuple[int, np.ndarray]] = OrderedDict()
        self._bytes = 0
        self._count = 0

    def put(self, image_id: int, low_res: np.ndarray) -> str:
        self._count += 1
        result_id = f"r{self._count}"
        self._results[result_id] = (image_id, low_res)
        self._bytes += low_res.nbytes
        while self._bytes > self.max_bytes and len(self._results) > 1:
            _, (_, old) = self._results.popitem(last=False)
            self._bytes -= old.nbytes
        return result_id

    def get(self, image_id: int, result_id: str, candidate: int) -> np.ndarray:
        """The 1 x h x w logits of one candidate of a kept result of this image."""
        if result_id not in self._results:
            raise HintExpired(f"mask hint {result_id!r} is no longer kept: decode its prompt again")
        owner, low_res = self._results[result_id]
        self._results.move_to_end(result_id)
        if owner != image_id:
            raise ValueError(f"mask hint {result_id!r} belongs to image {owner}, not image {image_id}")
        if not 0 <= candidate < low_res.shape[0]:
            raise ValueError(f"mask hint {result_id!r} has candidates 0..{low_res.shape[0] - 1}, not {candidate}")
        return low_res[candidate : candidate + 1]


class Engine:
    """All MLX work of the app (see the module's docstring): submit from any thread, ``run`` on one."""

    def __init__(self, model, library: Library, tokens_dir: Path, sizing: str = "original",
                 size: int | tuple[int, int] | None = None, keep_images: int = 6, idle_seconds: float = 0.4,
                 hint_bytes: int = 256 << 20, tokens_cache_bytes: int = 2 << 30,
                 log: Callable[[str], None] = lambda message: None):
        self.model = model
        self._fast = FastSam(model)  # hover decodes through the fast path directly
        self.log = log
        self.library = library
        self.tokens_dir = Path(tokens_dir)
        self.tokens_cache_bytes = tokens_cache_bytes
        self.sizing = sizing
        self.size = SamPredictor(model, sizing=sizing, size=size).size  # checked, and the default filled in
        self.keep_images = keep_images
        self.idle_seconds = idle_seconds
        self.hints = HintStore(hint_bytes)
        self._wake = threading.Condition()
        self._jobs: deque[tuple[int, Callable[[], Any], Future]] = deque()  # (image id, work, its future)
        self._hovers: dict[Any, tuple[Callable[[], Any], Future]] = {}
        self._focus: int | None = None  # the image the user looks at
        self._wanted: list[int] = []  # images to encode: the focus first, then the ones ahead
        self._last_interactive = 0.0
        self._stopping = False
        self._predictors: OrderedDict[int, SamPredictor] = OrderedDict()
        self._encode_times: deque[float] = deque(maxlen=8)
        self.hovers_dropped = 0
        self.fingerprint = model_fingerprint(model)

    # ---------------------------------------------------------------- any thread
    def decode(self, image_id: int, prompt: Prompt, mask_format: str = "png", return_low_res: bool = False,
               max_side: int | None = None) -> Future:
        """Future of ``decode_now``'s result."""
        return self._submit(image_id, lambda: self.decode_now(image_id, prompt, mask_format, return_low_res, max_side))

    def replay(self, image_id: int, steps: list[tuple[Prompt, int]]) -> Future:
        """Future of ``replay_now``'s result."""
        return self._submit(image_id, lambda: self.replay_now(image_id, steps))

    def hover(self, key: Any, image_id: int, x: float, y: float, mask_format: str = "png",
              max_side: int | None = None) -> Future:
        """Future of the hover mask at (x, y): the best of 3 candidates for one point; None if the image is
        not encoded yet. Replaces (cancels) the pending hover of the same ``key`` that has not started."""
        future: Future = Future()
        with self._wake:
            old = self._hovers.pop(key, None)
            if old is not None and old[1].cancel():
                self.hovers_dropped += 1
            self._hovers[key] = (lambda: self._hover_now(image_id, x, y, mask_format, max_side), future)
            self._last_interactive = time.monotonic()
            self._wake.notify_all()
        return future

    def focus(self, image_id: int, prefetch: int = 2) -> None:
        """Encode this image first, then the ``prefetch`` images after it (in the library's order)."""
        entries = self.library.all()
        ahead = [e.id for e in entries[image_id + 1 : image_id + 1 + prefetch]]
        with self._wake:
            self._focus, self._wanted = image_id, [image_id, *ahead]
            self._wake.notify_all()

    def expected_encode_seconds(self) -> float | None:
        """The median time of this run's recent encodes: how long the next one should take."""
        times = list(self._encode_times)
        return round(median(times), 2) if times else None

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()

    def _submit(self, image_id: int, work: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._wake:
            if self._stopping:
                future.set_exception(EngineStopped("the app is stopping"))
                return future
            self._jobs.append((image_id, work, future))
            self._last_interactive = time.monotonic()
            self._wake.notify_all()
        return future

    # ---------------------------------------------------------------- the interactive thread
    def run(self, until: Callable[[], bool] = lambda: False) -> None:
        """Decode on this thread, encode on another, until ``stop()`` or ``until()`` (checked every 0.2 s)."""
        encoder = threading.Thread(target=self._encode_loop, name="sam-mlx-app-encoder")
        encoder.start()
        try:
            while True:
                work = self._next_work()
                if work is None:
                    if self._stopping or until():
                        return
                    continue
                run, future = work
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(run())
                    except Exception as exc:  # handed to the waiting request
                        future.set_exception(exc)
        finally:
            with self._wake:
                self._stopping = True
                jobs, hovers = [f for _, _, f in self._jobs], [f for _, f in self._hovers.values()]
                self._jobs.clear()
                self._hovers.clear()
                self._wake.notify_all()
            for future in jobs:  # answered: their requests get 503 at once
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineStopped("the app is stopping"))
            for future in hovers:
                future.cancel()
            encoder.join()  # after the encode it may be in, which cannot be interrupted

    def _next_work(self) -> tuple[Callable[[], Any], Future] | None:
        """The first decode of an image that is ready (or failed), else the next hover, or None after waiting up to
        0.2 s for one. A decode of an image still to encode waits in the queue, its image encoded first: decodes
        of ready images pass it."""
        with self._wake:
            if self._stopping:
                return None
            for job in self._jobs:
                image_id = job[0]
                if image_id in self._predictors or self.library.get(image_id).status == "error":
                    self._jobs.remove(job)
                    return job[1:]
            if self._jobs:
                self._encode_first(self._jobs[0][0])
            if self._hovers:
                return self._hovers.pop(next(iter(self._hovers)))
            self._wake.wait(0.2)
            return None

    def predictor(self, image_id: int) -> SamPredictor:
        """The image's predictor, once the encoder thread has it (from memory, disk, or encoded now)."""
        entry = self.library.get(image_id)
        with self._wake:
            while image_id not in self._predictors:
                if entry.status == "error":
                    raise ValueError(entry.error)
                if self._stopping:
                    raise EngineStopped("the app is stopping")
                self._encode_first(image_id)
                self._wake.wait(0.2)
            self._predictors.move_to_end(image_id)
            return self._predictors[image_id]

    def _encode_first(self, image_id: int) -> None:
        """(Holding the lock.) Make the image the encoder's next one."""
        if self._focus != image_id:
            self._focus = image_id
            self._wanted = [image_id, *(i for i in self._wanted if i != image_id)]
            self._wake.notify_all()

    # ---------------------------------------------------------------- the encoder thread
    def _encode_loop(self) -> None:
        while True:
            with self._wake:
                image_id = self._next_encode()
                if image_id is None:
                    return
            try:
                predictor = self._open(self.library.get(image_id))
            except Exception:  # recorded on the image's entry
                predictor = None
            with self._wake:
                if predictor is not None:
                    self._predictors[image_id] = predictor
                    while len(self._predictors) > self.keep_images:
                        self._predictors.popitem(last=False)
                self._wake.notify_all()

    def _next_encode(self) -> int | None:
        """(Holding the lock.) The next image to encode, waiting for one; None when stopping."""
        while not self._stopping:
            self._wanted = [i for i in self._wanted
                            if i not in self._predictors and self.library.get(i).status != "error"]
            idle = time.monotonic() - self._last_interactive
            if self._wanted and (self._wanted[0] == self._focus or idle >= self.idle_seconds):
                return self._wanted[0]
            self._wake.wait(min(0.2, max(self.idle_seconds - idle, 0.01)) if self._wanted else 0.2)
        return None

    def _open(self, entry: ImageEntry) -> SamPredictor:
        entry.status, entry.encode_started = "encoding", time.monotonic()
        try:
            predictor = SamPredictor(self.model, sizing=self.sizing, size=self.size)
            path = self.library.image_path(entry)  # as it is now: not a link to elsewhere
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
            size = "x".join(map(str, self.size)) if isinstance(self.size, tuple) else self.size
            tokens_path = self.tokens_dir / f"{digest}-{self.fingerprint}-{self.sizing}-{size}.safetensors"
            on_disk = not self.model.config.hq  # a tokens file cannot hold HQ-SAM's early features
            if on_disk and self._load_tokens(predictor, tokens_path):
                os.utime(tokens_path)  # used now: the last to be removed from a full cache
            else:
                image = load_image(path)
                start = time.perf_counter()
                predictor.set_image(image)
                entry.encode_seconds = round(time.perf_counter() - start, 2)
                self._encode_times.append(entry.encode_seconds)
                if on_disk:
                    save_image_tokens(predictor, tokens_path, image_name=str(entry.path))
                    trim_tokens_cache(self.tokens_dir, tokens_path, self.tokens_cache_bytes)
                self.log(f"sam-mlx app: encoded {entry.path.name} in {entry.encode_seconds:.1f} s"
                         + (f" -> {tokens_path}" if on_disk else ""))
            entry.cached = on_disk
        except Exception as exc:
            entry.status, entry.error = "error", " ".join(str(exc).split()) or type(exc).__name__
            self.log(f"sam-mlx app: cannot open {entry.path}: {entry.error}")
            raise
        finally:
            entry.encode_started = None
        height, width = predictor.original_size
        entry.size, entry.status = (width, height), "ready"
        return predictor

    @staticmethod
    def _load_tokens(predictor: SamPredictor, path: Path) -> bool:
        """Load a tokens file if it is there and fits this model and sizing; False means encode."""
        if not path.is_file():
            return False
        try:
            load_image_tokens(predictor, path)
        except (ImageTokensError, ValueError):
            return False  # damaged or made otherwise: encoded again and overwritten
        return True

    # ---------------------------------------------------------------- the interactive thread's work
    def decode_now(self, image_id: int, prompt: Prompt, mask_format: str, return_low_res: bool,
                   max_side: int | None = None) -> dict:
        """Decode a prompt on the image: masks (encoded, ``max_side`` at most), scores, the result id for later
        hints, timings."""
        predictor = self.predictor(image_id)
        hint = prompt.hint
        if isinstance(hint, tuple):
            hint = self.hints.get(image_id, *hint)
        start = time.perf_counter()
        masks, scores, low_res = predictor.predict(prompt.points, prompt.labels, prompt.box, hint, prompt.multimask)
        decode_ms = (time.perf_counter() - start) * 1e3
        encoded = encode_masks(masks, mask_format, max_side)
        result = {
            "result": self.hints.put(image_id, low_res),
            "scores": [round(float(s), 5) for s in scores],
            "masks": encoded,
            "decode_ms": round(decode_ms, 2),
            "encode_ms": round((time.perf_counter() - start) * 1e3 - decode_ms, 2),  # the masks' PNG or RLE
        }
        if return_low_res:
            result["low_res"] = low_res
        return result

    def replay_now(self, image_id: int, steps: list[tuple[Prompt, int]]) -> tuple[np.ndarray, float]:
        """An object's prompt steps decoded again in order, each with the previous step's selected candidate as
        its hint -> (the last step's selected mask H x W, its score): the mask the page showed."""
        predictor = self.predictor(image_id)
        if not steps:
            raise ValueError("an object needs at least one prompt step")
        hint = None
        for number, (prompt, selected) in enumerate(steps):
            masks, scores, low_res = predictor.predict(prompt.points, prompt.labels, prompt.box, hint, prompt.multimask)
            if not 0 <= selected < len(scores):
                raise ValueError(f"step {number} selects candidate {selected} of {len(scores)}")
            hint = low_res[[selected]]
        return masks[selected], float(scores[selected])

    def _hover_now(self, image_id: int, x: float, y: float, mask_format: str, max_side: int | None) -> dict | None:
        """One foreground point: 3 candidates decoded, the best one upscaled (no low-res logits kept)."""
        with self._wake:
            if image_id not in self._predictors:
                entry = self.library.get(image_id)
                if entry.status == "error":
                    raise ValueError(f"{entry.path.name} could not be encoded: {entry.error}")
                return None
        predictor = self.predictor(image_id)
        start = time.perf_counter()
        with predictor.lock:  # the predictor's image through the fast path: only the best candidate is upscaled
            image = predictor.encoded_image
            height, width = image.geometry.original_size
            if not (0 <= x <= width and 0 <= y <= height):
                raise ValueError(f"point ({x:g}, {y:g}) is outside the {width}x{height} image")
            point = mx.array(image.geometry.to_input_coords(np.array([[[x, y]]])))
            low_res, scores = self._fast.decode(image, (point, mx.ones((1, 1), mx.int32)), None, None,
                                                multimask_output=True, read_grid_only=True)
            best = int(scores[0].argmax())
            mask = self._fast.masks_above(image, low_res[0, best], (MASK_THRESHOLD,))[0]
        decode_ms = (time.perf_counter() - start) * 1e3
        return {"score": round(float(scores[0, best]), 5), "mask": encode_masks(mask[None], mask_format, max_side)[0],
                "decode_ms": round(decode_ms, 2)}
