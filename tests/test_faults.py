"""Processes killed mid-write and processes racing each other never leave a file that passes for a model.

Every fault is real: a child process (``python -c``) is stopped with SIGKILL while it writes,
or two children convert the same checkpoint into one cache at once. The children make the
slow moment deterministic by replacing ``mx.save_safetensors`` (or the Hub download) with
one that writes half of the real bytes, says so through a flag file and then waits.
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

import sam_mlx  # first: loads OpenBLAS before mlx

# isort: split
import huggingface_hub  # noqa: E402
import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from reference import build_reference_sam  # noqa: E402
from sam_mlx.checkpoints import hub  # noqa: E402
from sam_mlx.checkpoints.load import CheckpointError, load_checkpoint  # noqa: E402
from sam_mlx.io.tokens import ImageTokensError, read_image_tokens  # noqa: E402

REPO = "someone/tiny-sam"
FILE = "sam_tiny.pth"

# Shared start of every child: its arguments (JSON in argv[1]) and a replacement for
# mx.save_safetensors that writes the real file (or half of it), touches flag files and
# then waits for others to appear (a flag nobody makes: until it is killed).
PREAMBLE = '''
import json, os, sys, time, warnings
from pathlib import Path
import sam_mlx
import mlx.core as mx
from sam_mlx.checkpoints import hub
from sam_mlx.checkpoints.load import load_checkpoint

args = json.loads(sys.argv[1])
real_save = mx.save_safetensors

def wait_for(flags):
    deadline = time.monotonic() + 120
    while not all(Path(f).exists() for f in flags):
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {flags}")
        time.sleep(0.01)

def slow_save(path, *a, **k):
    real_save(path, *a, **k)
    if args.get("half"):
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
    for flag in args.get("touch", []):
        Path(flag).touch()
    wait_for(args.get("wait", []))

def report(**values):
    print(json.dumps(values), flush=True)
'''


CHILDREN: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_children():
    """A failing test does not leave its waiting children behind."""
    yield
    while CHILDREN:
        proc = CHILDREN.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def start(body: str, cache: Path, **args) -> subprocess.Popen:
    """Run PREAMBLE + body in a new interpreter with ``cache`` as $SAM_MLX_CACHE."""
    env = {**os.environ, "SAM_MLX_CACHE": str(cache)}
    env.pop("HF_HUB_OFFLINE", None)
    script = PREAMBLE + textwrap.dedent(body)
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], env=env, cwd=cache.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    CHILDREN.append(proc)
    return proc


def wait_for_flag(flag: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the child touches ``flag``; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not flag.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) before {flag.name}:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child never reached {flag.name}")
        time.sleep(0.01)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL: no handler, no finally, no atexit runs in the child."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def finish(proc: subprocess.Popen) -> dict:
    """The child's JSON report once it exits successfully."""
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def is_temporary(path: Path) -> bool:
    """atomic_write's temporaries: hidden ``.<final name>.<random>.tmp.safetensors``."""
    return path.name.startswith(".") and ".tmp" in path.name


def same_weights(a, b) -> bool:
    wa, wb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return wa.keys() == wb.keys() and all(mx.array_equal(wa[k], wb[k]).item() for k in wa)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small random Meta-format ViT SAM checkpoint (.pth)."""
    path = tmp_path_factory.mktemp("faults") / FILE
    torch.save(build_reference_sam(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,)).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference_model(checkpoint):
    return load_checkpoint(checkpoint)


CONVERT = '''
mx.save_safetensors = slow_save
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    path = hub.resolve_checkpoint(args["source"])  # sam_mlx.load's two steps, to see the path
    model = load_checkpoint(path)
for flag in args.get("done", []):
    Path(flag).touch()
report(path=str(path), warnings=[str(w.message) for w in caught])
'''


def test_conversion_killed_mid_write(checkpoint, reference_model, tmp_path, monkeypatch):
    """SIGKILL while the converted file is half written: no final file exists, the half-written
    temporary is not a loadable model and is never picked up, and the next load converts
    again, gives the right weights and removes the dead temporary."""
    cache = tmp_path / "cache"
    ready = tmp_path / "ready"
    proc = start(CONVERT, cache, source=str(checkpoint), half=True, touch=[str(ready)], wait=[str(tmp_path / "never")])
    wait_for_flag(ready, proc)
    kill(proc)
    left = files(cache)
    assert len(left) == 1 and is_temporary(left[0]), left
    with pytest.raises(CheckpointError):
        load_checkpoint(left[0])

    monkeypatch.setenv("SAM_MLX_CACHE", str(cache))
    assert same_weights(sam_mlx.load(str(checkpoint)), reference_model)
    (final,) = files(cache)
    assert not is_temporary(final) and final == hub.resolve_checkpoint(checkpoint)


DOWNLOAD = '''
import huggingface_hub
from huggingface_hub.errors import LocalEntryNotFoundError

def fake_download(repo_id, filename, *, local_files_only=False, **_):
    """Like hf_hub_download: stream into <file>.incomplete, rename when complete."""
    final = Path(args["hf_cache"]) / repo_id / filename
    if final.is_file():
        return str(final)
    if local_files_only:
        raise LocalEntryNotFoundError("not in the local cache")
    data = Path(args["source"]).read_bytes()
    part = final.with_name(final.name + ".incomplete")
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        for flag in args.get("touch", []):
            Path(flag).touch()
        wait_for(args.get("wait", []))
        f.write(data[len(data) // 2 :])
    os.replace(part, final)
    return str(final)

huggingface_hub.hf_hub_download = fake_download
hub.hub_reachable = lambda: True  # the fake Hub answers
path = hub.resolve_checkpoint(args["repo"])
load_checkpoint(path)
report(path=str(path))
'''


def test_download_killed_midway(checkpoint, reference_model, tmp_path, monkeypatch):
    """SIGKILL half-way through a Hub download: sam_mlx's cache holds nothing, so an offline
    resolve fails cleanly instead of using a partial file, and the next run downloads,
    converts and loads the right weights."""
    cache, hf_cache, ready = tmp_path / "cache", tmp_path / "hf_cache", tmp_path / "ready"
    common = dict(source=str(checkpoint), hf_cache=str(hf_cache), repo=f"{REPO}:{FILE}")
    proc = start(DOWNLOAD, cache, **common, touch=[str(ready)], wait=[str(tmp_path / "never")])
    wait_for_flag(ready, proc)
    kill(proc)
    assert files(cache) == []
    assert [p.name for p in files(hf_cache)] == [f"{FILE}.incomplete"]

    def offline_download(repo_id, filename, **_):
        cached = hf_cache / repo_id / filename
        if cached.is_file():
            return str(cached)
        raise LocalEntryNotFoundError("not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="not cached"):
        hub.resolve_checkpoint(f"{REPO}:{FILE}", cache_dir=cache)

    path = Path(finish(start(DOWNLOAD, cache, **common))["path"])
    assert path.parent == cache / "hub" / f"{REPO.replace('/', '--')}--{FILE}"
    assert files(cache) == [path] and same_weights(load_checkpoint(path), reference_model)


def test_two_processes_convert_at_once(checkpoint, reference_model, tmp_path):
    """Two processes convert the same checkpoint into one cache, their writes overlapping, the
    first finishing (rename and clean-up of stale files) while the second is still writing:
    both end up with the cached file, without warnings, and it is the only file left."""
    cache = tmp_path / "cache"
    second_writing, first_done = tmp_path / "second_writing", tmp_path / "first_done"
    first = start(CONVERT, cache, source=str(checkpoint), wait=[str(second_writing)], done=[str(first_done)])
    second = start(CONVERT, cache, source=str(checkpoint), touch=[str(second_writing)], wait=[str(first_done)])
    reports = [finish(first), finish(second)]
    assert [r["warnings"] for r in reports] == [[], []]
    paths = {Path(r["path"]) for r in reports}
    assert len(paths) == 1 and files(cache) == list(paths)
    assert same_weights(load_checkpoint(paths.pop()), reference_model)


TOKENS = '''
import shutil
import numpy as np
from sam_mlx.io.tokens import save_image_tokens

predictor = sam_mlx.SamPredictor(sam_mlx.load(args["source"]), sizing="stretch", size=128)
predictor.set_image(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
if args["existing"]:
    save_image_tokens(predictor, args["target"])
    shutil.copyfile(args["target"], args["copy"])
predictor.set_image(np.random.default_rng(1).integers(0, 256, (80, 60, 3), dtype=np.uint8))
mx.save_safetensors = slow_save
save_image_tokens(predictor, args["target"])
'''


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_save_image_tokens_killed_mid_write(checkpoint, tmp_path, existing):
    """SIGKILL while tokens are half written: a new file never appears, an overwritten one keeps
    its complete old contents; only a hidden temporary is left, which is not a tokens file."""
    out, ready = tmp_path / "out", tmp_path / "ready"
    out.mkdir()
    target, copy = out / "tokens.safetensors", tmp_path / "before.safetensors"
    proc = start(TOKENS, tmp_path / "cache", source=str(checkpoint), target=str(target), copy=str(copy),
                 existing=existing, half=True, touch=[str(ready)], wait=[str(tmp_path / "never")])
    wait_for_flag(ready, proc)
    kill(proc)
    left = files(out)
    temporaries = [p for p in left if is_temporary(p)]
    assert len(temporaries) == 1 and [p for p in left if p not in temporaries] == ([target] if existing else [])
    if existing:
        assert target.read_bytes() == copy.read_bytes()
        assert read_image_tokens(target).geometry.original_size == (60, 80)
    with pytest.raises(ImageTokensError):
        read_image_tokens(temporaries[0])
