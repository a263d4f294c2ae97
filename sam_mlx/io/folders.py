"""Image inputs as users name them: files and folders (optionally recursive), and unique output names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class ImageInput:
    """An image to process: its path and its COCO ``file_name`` (the path below the folder it was found in)."""

    path: Path
    name: str


def expand_images(inputs: Sequence[str], recursive: bool = False, out_dir: Path | None = None) -> list[ImageInput]:
    """Files as given, folders as the images inside them (sorted; with ``recursive``, in subfolders too).

    An output folder inside an input folder is skipped, so a rerun does not take the masks for images.
    Raises FileNotFoundError for a path that does not exist, ValueError for a folder without images.
    """
    skip = out_dir.resolve() if out_dir is not None else None
    images: list[ImageInput] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            candidates = path.rglob("*") if recursive else path.iterdir()
            found = sorted(
                p for p in candidates if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not (skip is not None and skip != path.resolve() and skip in p.resolve().parents)
            )
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
            images.extend(ImageInput(p, p.relative_to(path).as_posix()) for p in found)
        elif path.is_file():
            images.append(ImageInput(path, path.name))
        else:
            raise FileNotFoundError(f"image not found: {path}")
    return images


def output_stems(images: Sequence[Path]) -> list[str]:
    """File-name stems for the outputs, made unique when two inputs share a name (``a``, ``a-2``, ...)."""
    stems, seen = [], set()
    for path in images:
        stem, n = path.stem, 1
        while stem in seen:
            n += 1
            stem = f"{path.stem}-{n}"
        seen.add(stem)
        stems.append(stem)
    return stems
