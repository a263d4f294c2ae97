"""SAM as the plain reference model: one module per component, channels-last, each readable top to bottom."""

from .sam import Sam

__all__ = ["Sam"]
