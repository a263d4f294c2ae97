"""``segment_anything.SamAutomaticMaskGenerator`` on sam_mlx: sam_mlx's generator (the original's options, filters
and records) with the original's ``predictor`` attribute."""

from __future__ import annotations

from ..amg import automatic_mask_generator as core
from .predictor import SamPredictor


class SamAutomaticMaskGenerator(core.SamAutomaticMaskGenerator):
    """Masks for everything in an image: ``generate(image)`` -> list of records (``segmentation``, ``area``,
    ``bbox``, ``predicted_iou``, ``point_coords``, ``stability_score``, ``crop_box``); the options are the
    original's, in its order. ``postprocess_small_regions`` takes sam_mlx's numpy ``MaskData``."""

    @property
    def predictor(self) -> SamPredictor:
        """A predictor on the generator's model (made when first asked for; ``generate`` runs the fast path
        directly)."""
        if getattr(self, "_predictor", None) is None:
            self._predictor = SamPredictor(self._sam.model)
        return self._predictor
