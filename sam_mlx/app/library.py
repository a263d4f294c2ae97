"""The app's images and the folders it may read from and write to.

The app reads only inside what the user opened on the command line (image files, and the
folders given, with their sub-folders) and writes only inside the export folder the user
chose (``--out-dir``). Paths that arrive over HTTP are resolved (``..`` and symbolic links
followed) before they are checked against those folders, so neither can lead outside.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..io.folders import IMAGE_SUFFIXES, expand_images, output_stems
from ..io.images import load_image
from .limits import MAX_PATH_CHARS

# Formats a browser shows as they are; other images (and EXIF-rotated ones) are sent re-encoded as decoded.
_BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_EXIF_ORIENTATION = 0x0112


class Forbidden(ValueError):
    """A path outside the folders the user opened or chose."""


class UnknownImage(KeyError):
    """An image id the app does not have."""


@dataclass
class ImageEntry:
    """One image of the app. ``status``: new, encoding, ready (tokens in memory or on disk) or error."""

    id: int
    path: Path
    stem: str  # unique among the app's images: names its export files
    status: str = "new"
    error: str | None = None
    size: tuple[int, int] | None = None  # width, height (known once encoded or shown)
    encode_seconds: float | None = None  # the encoder's time, when this run encoded it
    encode_started: float | None = None  # time.monotonic() of the running encode
    cached: bool = False  # its tokens are in the tokens folder

    def describe(self, expected_seconds: float | None) -> dict:
        """The JSON the API reports for this image."""
        info = {"id": self.id, "name": self.path.name, "path": str(self.path), "stem": self.stem,
                "status": self.status, "error": self.error, "cached": self.cached,
                "width": self.size[0] if self.size else None, "height": self.size[1] if self.size else None,
                "encode_seconds": self.encode_seconds}
        if self.status == "encoding" and self.encode_started is not None:
            elapsed = time.monotonic() - self.encode_started
            info["elapsed_seconds"] = round(elapsed, 2)
            info["expected_seconds"] = expected_seconds
        return info


class Library:
    """The images the app serves (ids in order of opening) and the folders it may touch."""

    def __init__(self, inputs: list[str], out_dir: str | Path):
        self._lock = threading.Lock()
        self.entries: list[ImageEntry] = []
        self.folders = [p for p in (Path(t).expanduser().resolve() for t in inputs) if p.is_dir()]
        self.export_root = Path(out_dir).expanduser().resolve()
        # The files named and those listed in the opened folders are the user's choice (links to elsewhere too).
        self.files = {entry.path for entry in self._add_paths(self._list(inputs))}

    # ---------------------------------------------------------------- images
    def get(self, image_id: int) -> ImageEntry:
        with self._lock:
            if not 0 <= image_id < len(self.entries):
                raise UnknownImage(f"no image with id {image_id} (the app has {len(self.entries)})")
            return self.entries[image_id]

    def all(self) -> list[ImageEntry]:
        with self._lock:
            return list(self.entries)

    def open(self, text: str) -> list[ImageEntry]:
        """The images of a file or folder path inside the opened folders, added if new.

        A folder's files are checked one by one: a symbolic link in it that leads outside is left out.
        """
        path = self.readable(text)
        paths = [p.resolve() for p in self._list([str(path)])]  # ValueError: a folder without images
        inside = [p for p in paths if self._allowed(p)]
        if not inside:
            raise Forbidden(f"{text}: its images lead outside the folders opened by `sam-mlx app`")
        return self._add_paths(inside)

    def _list(self, inputs: list[str]) -> list[Path]:
        """The image files named and those in the folders named (not those in the export folder)."""
        return [image.path for image in expand_images(inputs, out_dir=self.export_root)]

    def _add_paths(self, paths: list[Path]) -> list[ImageEntry]:
        with self._lock:
            known = {e.path: e for e in self.entries}
            added = []
            for path in (p.resolve() for p in paths):
                if path not in known:
                    known[path] = ImageEntry(len(self.entries), path, "")
                    self.entries.append(known[path])
                added.append(known[path])
            for entry, stem in zip(self.entries, output_stems([e.path for e in self.entries])):
                entry.stem = stem  # earlier stems stay as they were: new names only get suffixes
            return added

    def readable(self, text: str) -> Path:
        """An image file or folder inside the opened folders (or an opened file), resolved."""
        if len(text) > MAX_PATH_CHARS or "\0" in text:
            raise ValueError(f"{text[:60]}...: not a path (over {MAX_PATH_CHARS} characters or with a NUL)")
        try:
            path = Path(text).expanduser().resolve()
            if not self._allowed(path):
                raise Forbidden(f"{text}: outside the folders opened by `sam-mlx app`")
            if not path.exists():
                raise ValueError(f"{text}: no such file or folder")
            if not (path.is_file() or path.is_dir()):  # a FIFO, a device: reading it could wait for ever
                raise ValueError(f"{text}: not a regular file or a folder")
        except OSError as exc:  # e.g. a name too long for the file system
            raise ValueError(f"{text}: {exc.strerror or exc}") from None
        if path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{text}: not an image ({', '.join(IMAGE_SUFFIXES)})")
        return path

    def image_path(self, entry: ImageEntry) -> Path:
        """The image's file, checked again now: a file replaced by a link leading outside the opened folders (or
        by something that is not a file) since it was opened is refused."""
        resolved = entry.path.resolve()
        if not self._allowed(resolved):
            raise Forbidden(f"{entry.path}: now leads outside the folders opened by `sam-mlx app`")
        if not resolved.is_file():
            raise ValueError(f"{entry.path}: no longer a regular file")
        return resolved

    def _allowed(self, resolved: Path) -> bool:
        return resolved in self.files or any(resolved.is_relative_to(folder) for folder in self.folders)

    # ---------------------------------------------------------------- export
    def export_dir(self, text: str) -> Path:
        """A folder inside the export folder: ``text`` relative to it ("" for itself), resolved."""
        relative = Path(text or ".")
        if relative.is_absolute():
            path = relative.resolve()
        else:
            path = (self.export_root / relative).resolve()
        if not path.is_relative_to(self.export_root):
            raise Forbidden(f"{text}: outside the export folder {self.export_root}")
        return path

    def export_file(self, path: Path) -> Path:
        """``path`` (a file or folder to read or write in the export folder) if it resolves, now, inside it."""
        if not path.resolve().is_relative_to(self.export_root):
            raise Forbidden(f"{path}: leads outside the export folder {self.export_root}")
        return path


def display_image(entry: ImageEntry, path: Path) -> tuple[bytes, str]:
    """The image (its file ``path``, checked by ``Library.image_path``) as a browser should show it (the pixels the
    model sees): (bytes, media type).

    JPEG, PNG and WebP files without an EXIF rotation are sent as they are; others are decoded as the
    model decodes them (``load_image``: EXIF-rotated, RGB) and sent as PNG. Records the image's size.
    """
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            media_type = _BROWSER_FORMATS.get(im.format or "")
            rotated = im.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
            size = im.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{entry.path}: not a readable image ({exc})") from None
    if media_type and not rotated:
        entry.size = entry.size or size
        return data, media_type
    array = load_image(path)
    entry.size = (array.shape[1], array.shape[0])
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), "image/png"
