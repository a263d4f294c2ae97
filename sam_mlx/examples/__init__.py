"""Sample photos shipped in the package, so that a first segment needs nothing but the install.

``truck.jpg`` is the truck photo of Meta's segment-anything notebooks (Apache-2.0), resized to 900 x 600: the
coordinates in the docs, written for the 1800 x 1200 original, are halved for it.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
EXAMPLES = ("truck",)


def example_image(name: str = "truck") -> Path:
    """The path of the sample photo ``name`` (one of ``EXAMPLES``), a JPEG inside the installed package."""
    if name not in EXAMPLES:
        raise ValueError(f"no example image {name!r}: the examples are {', '.join(EXAMPLES)}")
    path = _HERE / f"{name}.jpg"
    if not path.is_file():  # an install that left out the package data
        raise FileNotFoundError(f"the example image {path} is missing from the installed sam_mlx package")
    return path
