"""The sample photo shipped in the package: found from an installed wheel (package data), and taken by the
command's ``--example`` (the README's first command is run by tests/test_readme.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import sam_mlx
from helpers import MOBILE_SAM

ROOT = Path(__file__).resolve().parents[1]


def test_example_image_is_the_truck():
    path = sam_mlx.example_image("truck")
    assert path.is_file() and path.stat().st_size < 150_000
    with Image.open(path) as image:
        assert image.size == (900, 600) and image.format == "JPEG"


def test_unknown_example_names_the_examples():
    with pytest.raises(ValueError, match="no example image 'dog': the examples are truck"):
        sam_mlx.example_image("dog")


def test_installed_wheel_holds_the_example(tmp_path):
    """A wheel built from the tree carries truck.jpg, and the installed package finds it in its own folder."""
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside pyproject.toml
    shutil.copytree(ROOT / "sam_mlx", source / "sam_mlx", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "wheel").glob("sam_mlx-*.whl")
    assert "sam_mlx/examples/truck.jpg" in zipfile.ZipFile(wheel).namelist()
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not this tree
    found = subprocess.run([sys.executable, "-c", "import sam_mlx; print(sam_mlx.example_image('truck'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert found.returncode == 0, found.stderr
    path = Path(found.stdout.strip())
    assert path == target / "sam_mlx" / "examples" / "truck.jpg" and path.is_file()


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("examples_env")
    env = {k: v for k, v in os.environ.items() if k not in ("SAM_MLX_MODEL", "SAM_MLX_CACHE")}
    env.update(SAM_MLX_CACHE=str(root / "cache"), HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1")
    return env


def run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sam_mlx.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_everything_takes_the_example(env, tmp_path):
    result = run(env, "everything", "--example", "truck", "--points-per-side", "4", "--model", str(MOBILE_SAM),
                 "--out-dir", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "truck.json").is_file() and (tmp_path / "out" / "truck_overlay.png").is_file()


def test_example_errors_are_one_line(env, tmp_path):
    unknown = run(env, "segment", "--example", "dog", "--point", "1,1", "--model", str(MOBILE_SAM), cwd=tmp_path)
    assert unknown.returncode == 2 and "--example" in unknown.stderr and "truck" in unknown.stderr
    (tmp_path / "p.json").write_text('[{"image": "a.jpg", "points": [[1, 1]]}]')
    both = run(env, "segment", "--example", "truck", "--prompts", "p.json", "--model", str(MOBILE_SAM), cwd=tmp_path)
    assert both.returncode == 1 and len(both.stderr.strip().splitlines()) == 1 and "--example" in both.stderr
    nothing = run(env, "everything", "--model", str(MOBILE_SAM), "--out-dir", "out", cwd=tmp_path)
    assert nothing.returncode == 1 and "--example" in nothing.stderr
