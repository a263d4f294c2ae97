"""sam_mlx: Segment Anything (SAM v1) in MLX."""

from .ops.blas import load_system_blas

load_system_blas()  # must precede the first import of mlx

import mlx.core as mx  # noqa: E402

from .amg.automatic_mask_generator import SamAutomaticMaskGenerator  # noqa: E402
from .checkpoints.errors import CheckpointError  # noqa: E402
from .checkpoints.load import DTYPES, load_checkpoint, save_model  # noqa: E402
from .config import PromptDecoderConfig, SamConfig, TinyViTConfig, ViTConfig  # noqa: E402
from .examples import example_image  # noqa: E402
from .io.tokens import load_image_tokens, save_image_tokens  # noqa: E402
from .modeling.sam import Sam  # noqa: E402
from .predictor import SamPredictor  # noqa: E402

__version__ = "0.1.0"


def load(path_or_name: str, dtype: str | mx.Dtype | None = None) -> Sam:
    """Load a SAM model from a checkpoint path (.pth / .safetensors) or a model name / Hub repo id.

    ``dtype`` ("float32", "float16", "bfloat16" or an mlx dtype) casts every weight; by default
    the image encoder is half precision on an Apple GPU (MobileSAM's TinyViT float16, the ViT
    bfloat16) and float32 on the CPU, the rest float32 (``checkpoints.load.default_encoder_dtype``).
    """
    from .checkpoints.hub import resolve_checkpoint

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    return load_checkpoint(resolve_checkpoint(path_or_name), dtype=dtype)


__all__ = [
    "CheckpointError",
    "PromptDecoderConfig",
    "Sam",
    "SamAutomaticMaskGenerator",
    "SamConfig",
    "SamPredictor",
    "TinyViTConfig",
    "ViTConfig",
    "example_image",
    "load",
    "load_checkpoint",
    "load_image_tokens",
    "save_image_tokens",
    "save_model",
]
