"""The command's frictions of issue 31, as real subprocesses (as ``test_cli``): progress within an image, plural
agreement, a closed pipe, negative coordinates, ``app --help``'s --json, a missing path among several images."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import test_cli
from helpers import IMAGES
from sam_mlx.cli import build_parser
from sam_mlx.cli import run as run_module
from test_cli import DOG, MODEL, ok, run

env, dog_tokens = test_cli.env, test_cli.dog_tokens  # the fixtures, shared


def test_counts_agree_in_number(env, dog_tokens, tmp_path):
    one = ok(run(env, "segment", DOG, "--point", "250,400", "--single", "--tokens", str(dog_tokens),
                 "--out-dir", str(tmp_path), "--model", MODEL))
    assert "[1/1]" in one.stderr and " 1 mask in " in one.stderr and "1 masks" not in one.stderr
    three = ok(run(env, "segment", DOG, "--point", "250,400", "--tokens", str(dog_tokens),
                   "--out-dir", str(tmp_path), "--model", MODEL))
    assert " 3 masks in " in three.stderr


def test_a_closed_pipe_ends_quietly(env, tmp_path):
    """``sam-mlx ... | head -1``: the reader goes away after one line; the command stops without a message."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("dog.jpg", "groceries.jpg"):
        (photos / name).symlink_to(IMAGES / name)
    for args in (["info", "--json"],
                 ["segment", str(photos), "--point", "100,100", "--json", "--out-dir", str(tmp_path / "out"),
                  "--model", MODEL]):
        process = subprocess.Popen([sys.executable, "-m", "sam_mlx.cli", *args], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        first = process.stdout.readline()  # as head -1: one line, then the pipe is closed
        process.stdout.close()
        stderr = process.stderr.read()
        code = process.wait(timeout=600)
        assert json.loads(first), args
        assert code in (0, 141), (args, code, stderr)
        assert "Broken pipe" not in stderr and "Errno 32" not in stderr and "Exception" not in stderr, stderr
        assert "error" not in stderr, stderr


def test_negative_coordinates_are_values(env, tmp_path):
    """``--point -5,400`` is a point (outside the image here: the command says so), not a missing argument."""
    args = build_parser().parse_args(["segment", DOG, "--point", "-5,400", "--bg-point", "-1.5,-2", "--box",
                                      "-5,-2,90,80", "--point", "3,4"])
    assert args.point == [(-5, 400), (3, 4)] and args.bg_point == [(-1.5, -2)] and args.box == [(-5, -2, 90, 80)]
    result = run(env, "segment", DOG, "--point", "-5,400", "--out-dir", str(tmp_path), "--model", MODEL)
    assert result.returncode == 1 and "point -5,400 is outside dog.jpg" in result.stderr, result.stderr


def test_app_help_says_what_json_prints(env):
    text = " ".join(ok(run(env, "app", "--help")).stdout.split())
    assert "one JSON object per image" not in text
    assert "--json" in text and "url, port and token" in text


def test_a_missing_path_among_images_is_a_failure_of_the_run(env, tmp_path):
    missing = tmp_path / "missing.jpg"
    args = ["segment", str(missing), DOG, "--point", "250,400", "--single", "--model", MODEL]
    result = run(env, *args, "--out-dir", str(tmp_path / "out"), "--json")
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "out" / "dog_mask0.png").is_file()  # the other image was done
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())["failures"]
    assert failures == [{"image": str(missing), "error": f"image not found: {missing}"}]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[-1]["summary"]["images"] == 2 and records[-1]["summary"]["failed"] == 1
    assert f"1 of 2 images failed (listed in {tmp_path / 'out' / 'failures.json'})" in result.stderr

    stopped = run(env, *args, "--out-dir", str(tmp_path / "fast"), "--fail-fast")
    assert stopped.returncode == 1 and f"image not found: {missing}" in stopped.stderr
    assert not (tmp_path / "fast").exists()  # --fail-fast: stopped before the run started


def test_everything_shows_progress_within_the_image(env, tmp_path):
    """Not a terminal (a log, a pipe): a progress line when the image starts, throttled after; --json unchanged."""
    result = ok(run(env, "everything", DOG, "--points-per-side", "4", "--points-per-batch", "4", "--json",
                    "--out-dir", str(tmp_path), "--model", MODEL))
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"[1/1] {DOG}: 0/16 point prompts decoded", result.stderr
    assert lines[-1].startswith(f"[1/1] {DOG}: ") and " in " in lines[-1]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [sorted(r) for r in records] == [["files", "image", "scores", "seconds"], ["summary"]]


def test_progress_off_a_terminal_is_throttled(monkeypatch, capsys):
    clock = iter([0.0, 3.0, 10.5, 12.0, 25.0])
    monkeypatch.setattr(run_module, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    progress = run_module._ProgressBar("[1/2] a.jpg", every=10)
    assert not progress.live  # captured stderr is not a terminal
    for done in (0, 10, 50, 60, 100):
        progress(done, 100)
    assert capsys.readouterr().err.splitlines() == ["[1/2] a.jpg: 0/100 point prompts decoded",
                                                    "[1/2] a.jpg: 50/100 point prompts decoded"]
