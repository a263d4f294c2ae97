"""Draw masks, prompt points and boxes over an image (pillow and numpy only)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

FOREGROUND = (0, 200, 0)
BACKGROUND = (230, 0, 0)
BOX = (30, 144, 255)
_GOLDEN = 0.618033988749895


def distinct_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` saturated RGB colours whose hues step by the golden ratio, so neighbours differ."""
    return [
        tuple(int(c * 255) for c in colorsys.hsv_to_rgb((0.1 + i * _GOLDEN) % 1.0, 0.75, 0.95)) for i in range(n)
    ]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of an H x W bool mask that have a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def draw_overlay(
    image: np.ndarray,
    masks: Sequence[np.ndarray] = (),
    points: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    alpha: float = 0.45,
) -> Image.Image:
    """Masks blended in distinct colours over the image, with their outlines, points and boxes on top.

    image: H x W x 3 uint8 RGB; masks: H x W bool each, drawn largest first so smaller
    masks stay visible on top of the ones containing them; points: N x 2 (x, y) pixels
    with labels N (1 foreground: green, 0 background: red); boxes: B x 4 (x1, y1, x2, y2).
    """
    out = image.astype(np.float32)
    colors = distinct_colors(len(masks))
    for i in sorted(range(len(masks)), key=lambda i: -int(masks[i].sum())):
        mask = np.asarray(masks[i], dtype=bool)
        color = np.array(colors[i], np.float32)
        out[mask] = out[mask] * (1 - alpha) + color * alpha
        out[_outline(mask)] = color
    result = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    scale = max(image.shape[:2]) / 1000  # marks keep their look on small and large images
    width = max(2, round(3 * scale))
    for x1, y1, x2, y2 in np.asarray(boxes if boxes is not None else np.zeros((0, 4))).reshape(-1, 4):
        draw.rectangle((x1, y1, x2, y2), outline=BOX, width=width)
    if points is not None:
        radius = max(4, round(8 * scale))
        for (x, y), label in zip(np.asarray(points).reshape(-1, 2), np.asarray(labels).reshape(-1)):
            fill = FOREGROUND if label == 1 else BACKGROUND
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=fill, outline=(255, 255, 255), width=2)
    return result
