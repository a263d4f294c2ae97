"""Image files read from a path and from bytes (the Label Studio backend's fetched images) decode the same."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import IMAGES
from sam_mlx.io.images import decode_image_bytes, load_image


def test_image_bytes_decode_as_the_file_loads():
    path = IMAGES / "truck.jpg"
    np.testing.assert_array_equal(decode_image_bytes(path.read_bytes(), "truck.jpg"), load_image(path))


def test_unreadable_bytes_get_one_error_naming_the_image():
    with pytest.raises(ValueError, match=r"^task 7 image: not a readable image \("):
        decode_image_bytes(b"not an image", "task 7 image")
