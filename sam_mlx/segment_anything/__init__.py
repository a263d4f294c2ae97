"""segment_anything's public API on sam_mlx: change ``import segment_anything`` / ``from segment_anything import``
to ``sam_mlx.segment_anything`` and the rest of the code runs as it is (docs/segment-anything.md says what differs
and why). The module paths mirror the original's: ``.build_sam``, ``.predictor``, ``.automatic_mask_generator``,
``.modeling``, ``.utils.transforms``, ``.utils.amg``. torch is needed only where the original's user passes or
receives tensors."""

from .automatic_mask_generator import SamAutomaticMaskGenerator
from .build_sam import build_sam, build_sam_vit_b, build_sam_vit_h, build_sam_vit_l, build_sam_vit_t, sam_model_registry
from .predictor import SamPredictor

__all__ = [
    "SamAutomaticMaskGenerator",
    "SamPredictor",
    "build_sam",
    "build_sam_vit_b",
    "build_sam_vit_h",
    "build_sam_vit_l",
    "build_sam_vit_t",
    "sam_model_registry",
]
