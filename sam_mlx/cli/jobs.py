"""A run's images, their outcomes, and ``ImageWork``: the work on one image, shared by the run here and
``sam_mlx.ray_data``. Below the commands and ``ray_data``: it imports neither."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..io.export import Exporter, ImageEntry
from ..io.folders import ImageInput, output_stems
from .messages import CliError
from .prompts import Prompt

MODEL_ENV = "SAM_MLX_MODEL"


def _model_name(args: argparse.Namespace) -> str | None:
    return args.model or os.environ.get(MODEL_ENV)


def _model_to_load(args: argparse.Namespace) -> str:
    name = _model_name(args)
    if not name:
        raise CliError(f"no model: pass --model NAME|PATH (e.g. sam-vit-base or a .pth file) or set {MODEL_ENV}")
    return name


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
