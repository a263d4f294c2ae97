"""Running a command's work over its images, here or on Ray workers, and reporting each outcome and the failures."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator, Sequence

from ..ops.blas import reference_blas_in_use
from .jobs import ImageDone, ImageFailed, ImageJob, ImageWork
from .messages import CliError, _emit, _log, _one_line
from .outputs import _remove_temporaries, _write_json

FAILURES_FILE = "failures.json"


def _warn_if_slow_blas(command: str) -> None:
    if reference_blas_in_use():
        _log(f"sam-mlx {command}: warning: MLX multiplies with its bundled reference BLAS, ~60x slower than "
             "OpenBLAS: install libopenblas0-pthread (apt-get), which sam_mlx then loads")


class _ProgressBar:
    """An image's progress (segment everything's point prompts, over all its crops) on stderr: on a terminal one
    self-overwriting status line (the line of the outcome replaces it); elsewhere (a log, a pipe) a line when it
    starts and then at most one every ``every`` seconds."""

    def __init__(self, label: str, width: int = 30, every: float = 10.0):
        self.label, self.width, self.every = label, width, every
        self.live = sys.stderr.isatty()
        self.last: float | None = None  # when the last line was written (not live)

    def __call__(self, done: int, total: int) -> None:
        if self.live:
            filled = self.width * done // max(total, 1)
            bar = "#" * filled + "." * (self.width - filled)
            print(f"\r{self.label} [{bar}] {done}/{total} points", end="", file=sys.stderr, flush=True)
            return
        now = time.monotonic()
        if done < total and (self.last is None or now - self.last >= self.every):
            self.last = now
            _log(f"{self.label}: {done}/{total} point prompts decoded")


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
    from ..ray_data import RayOptions, run_jobs

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
