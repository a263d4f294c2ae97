import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import sam_mlx  # noqa: E402,F401  (loads OpenBLAS before anything imports mlx)

sys.path.insert(0, str(ROOT / "scripts"))
from precision import prompt_keywords as predict_kwargs  # noqa: E402,F401  (the tests' shared prompts)


@pytest.fixture(autouse=True, scope="session")
def _private_model_cache(tmp_path_factory):
    """Converted checkpoints go to a throwaway cache, not the user's ~/.cache."""
    os.environ["SAM_MLX_CACHE"] = str(tmp_path_factory.mktemp("sam_mlx_cache"))
    yield

SHARED = Path(os.environ.get("SAM_MLX_SHARED", ROOT.parent / "shared"))
IMAGES = SHARED / "images"
MOBILE_SAM = SHARED / "weights" / "mobile_sam.pt"
REFERENCE = SHARED / "reference" / "mobile_sam"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"shared data not found at {SHARED} (set SAM_MLX_SHARED)")
    return SHARED
