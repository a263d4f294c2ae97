"""The fast path: SAM over the plain model's parameters, fast on MLX's CPU backend (``FastSam``)."""

from .sam import EncodedImage, FastSam

__all__ = ["EncodedImage", "FastSam"]
