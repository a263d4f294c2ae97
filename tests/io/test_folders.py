"""Image inputs named as files and folders, and the output names made from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sam_mlx.io.folders import expand_images, output_stems


def test_recursive_folders_skip_the_output_folder(tmp_path):
    for name in ("a.jpg", "sub/b.png", "sub/deeper/c.JPG", "out/a_mask0.png", "notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    flat = expand_images([str(tmp_path)], out_dir=tmp_path / "out")
    deep = expand_images([str(tmp_path)], recursive=True, out_dir=tmp_path / "out")
    assert [i.name for i in flat] == ["a.jpg"]
    assert [i.name for i in deep] == ["a.jpg", "sub/b.png", "sub/deeper/c.JPG"]
    assert [i.name for i in expand_images([str(tmp_path / "sub")], recursive=True)] == ["b.png", "deeper/c.JPG"]


def test_missing_paths_and_empty_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.jpg"):
        expand_images([str(tmp_path / "nope.jpg")])
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=f"no images .* in folder {tmp_path}"):
        expand_images([str(tmp_path)])


def test_output_stems_are_unique_and_stable():
    paths = [Path("a/x.jpg"), Path("b/x.png"), Path("c/y.jpg"), Path("d/x.jpg")]
    assert output_stems(paths) == ["x", "x-2", "y", "x-3"]
    assert output_stems(paths[:2]) == output_stems(paths)[:2]  # a new name never renames the earlier ones
