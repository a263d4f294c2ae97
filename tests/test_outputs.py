"""What the command writes: nothing of the user's lost or deleted, nothing half-replaced, nothing left behind.

Real faults in child processes: a file-size limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored, so writes fail as on
a full disk) stands in for a full disk, SIGKILL for a killed run, and two real ``segment`` runs race into one
folder. MobileSAM's real weights; the dog photo's tokens are encoded once (``encode``) and spare the encoder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import IMAGES, MOBILE_SAM, ROOT

DOG = str(IMAGES / "dog.jpg")
CLI = "import sys; from sam_mlx.cli import main; sys.exit(main(sys.argv[1:]))"
# writes past this many bytes fail with EFBIG instead of killing the process
FILE_SIZE_LIMIT = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
                  "resource.setrlimit(resource.RLIMIT_FSIZE, ({0}, {0}))\n"


@pytest.fixture(scope="module")
def dog_tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "dog.safetensors"
    result = child("encode", DOG, "--out", str(path), "--model", str(MOBILE_SAM))
    assert result.returncode == 0, result.stderr
    return path


def child(*args: str, prelude: str = "", env: dict | None = None, wait: bool = True):
    """``sam-mlx ARGS`` in a new interpreter, after ``prelude``; the finished process, or the running one."""
    command = [sys.executable, "-c", prelude + CLI, *args]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def segment(out_dir: Path, tokens: Path, *extra: str, **kwargs):
    return child("segment", DOG, "--tokens", str(tokens), "--model", str(MOBILE_SAM), "--out-dir", str(out_dir),
                 *extra, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_consistent(folder: Path, stem: str = "dog") -> dict:
    """The JSON lists exactly the image's mask files on disk, and each PNG is the mask it describes."""
    report = json.loads((folder / f"{stem}.json").read_text())
    listed = {m["file"] for m in report["masks"]}
    on_disk = {p.name for p in folder.glob(f"{stem}_mask*.png")}
    assert listed == on_disk, (listed, on_disk)
    for record in report["masks"]:
        mask = np.array(Image.open(folder / record["file"])) > 0
        assert int(mask.sum()) == record["area"], record["file"]
    assert (folder / report["overlay"]).is_file()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "temporaries left behind"
    return report


def test_failed_rerun_leaves_the_previous_set_whole(dog_tokens, tmp_path):
    """Three masks, then a rerun for one mask whose overlay cannot be written (the disk is 'full')."""
    result = segment(tmp_path, dog_tokens, "--point", "250,400")
    assert result.returncode == 0, result.stderr
    before = snapshot(tmp_path)
    failed = segment(tmp_path, dog_tokens, "--point", "600,100", "--single", prelude=FILE_SIZE_LIMIT.format(100_000))
    assert failed.returncode == 1 and "could not write" in failed.stderr and "dog_overlay.png" in failed.stderr, \
        failed.stderr
    assert snapshot(tmp_path) == before
    assert len(assert_consistent(tmp_path)["masks"]) == 3


def test_only_files_the_previous_json_listed_are_deleted(dog_tokens, tmp_path):
    mine = {"dog_mask7.png": b"the user's own file, named like a mask", "dog_mask1_mask0.png": b"another image's"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    assert segment(tmp_path, dog_tokens, "--point", "250,400").returncode == 0
    assert segment(tmp_path, dog_tokens, "--point", "250,400", "--single").returncode == 0
    report = json.loads((tmp_path / "dog.json").read_text())
    assert [m["file"] for m in report["masks"]] == ["dog_mask0.png"]
    assert not (tmp_path / "dog_mask1.png").exists() and not (tmp_path / "dog_mask2.png").exists()
    for name, data in mine.items():
        assert (tmp_path / name).read_bytes() == data


def _blocked_on_a_lock(proc: subprocess.Popen) -> bool:
    try:
        return "lock" in Path(f"/proc/{proc.pid}/wchan").read_text()
    except OSError:
        return False


def test_two_runs_into_one_folder_keep_one_consistent_set(dog_tokens, tmp_path):
    """Run A (three masks) stops after writing its masks and overlay; run B (one mask) runs meanwhile; then A goes on.
    Both succeed, and the folder holds one run's whole set, the JSON matching the PNGs."""
    out, flags = tmp_path / "out", tmp_path / "flags"
    out.mkdir()
    flags.mkdir()
    pause = textwrap.dedent(f"""
        from pathlib import Path
        import time
        from PIL import Image
        real_save = Image.Image.save
        def save_then_wait(image, fp, *args, **kwargs):
            real_save(image, fp, *args, **kwargs)
            if "overlay" in str(fp):
                Path({str(flags / "a_wrote")!r}).touch()
                while not Path({str(flags / "go")!r}).exists():
                    time.sleep(0.01)
        Image.Image.save = save_then_wait
    """)
    run_a = segment(out, dog_tokens, "--point", "250,400", "--multimask", prelude=pause, wait=False)
    deadline = time.monotonic() + 300
    while not (flags / "a_wrote").exists():
        assert run_a.poll() is None and time.monotonic() < deadline, run_a.communicate()[1]
        time.sleep(0.01)
    run_b = segment(out, dog_tokens, "--point", "600,100", "--single", wait=False)
    while run_b.poll() is None and not _blocked_on_a_lock(run_b):  # B finishes (no lock) or waits for A's
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (flags / "go").touch()
    for run in (run_a, run_b):
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    report = assert_consistent(out)
    assert len(report["masks"]) in (1, 3)


def test_a_full_disk_while_caching_falls_back_and_names_the_path(tmp_path):
    """Converting MobileSAM into a cache that cannot take its 40 MB: a warning naming the file, and the model loads."""
    cache = tmp_path / "cache"
    script = FILE_SIZE_LIMIT.format(1 << 20) + textwrap.dedent(f"""
        import warnings
        import sam_mlx
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = sam_mlx.load({str(MOBILE_SAM)!r})
        print(model.config.name)
        print(" | ".join(str(w.message) for w in caught))
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "SAM_MLX_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-2000:]
    name, warning = result.stdout.strip().splitlines()[-2:]
    assert name == "tiny_vit"
    assert "could not cache the converted" in warning and "could not write " + str(cache) in warning, warning
    assert not [p for p in cache.rglob("*") if p.is_file()], "a partial cache file or temporary is left"


def test_a_killed_convert_leaves_no_temporary_for_ever(tmp_path):
    """A convert killed while writing leaves its hidden temporary in --out's folder; the next convert there
    removes it, and touches neither another program's hidden file nor a live writer's temporary."""
    out = tmp_path / "model.safetensors"
    flag = tmp_path / "writing"
    hang = textwrap.dedent(f"""
        import time
        from pathlib import Path
        import mlx.core as mx
        def half_then_hang(path, *args, **kwargs):
            Path(path).write_bytes(b"half a model")
            Path({str(flag)!r}).touch()
            time.sleep(600)
        mx.save_safetensors = half_then_hang
    """)
    killed = child("convert", str(MOBILE_SAM), "--out", str(out), prelude=hang, wait=False)
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1]
        time.sleep(0.01)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.safetensors.")]
    assert len(stale) == 1
    (tmp_path / ".notes.tmp").write_text("another program's hidden file")
    result = child("convert", str(MOBILE_SAM), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "model.safetensors", "writing"]
