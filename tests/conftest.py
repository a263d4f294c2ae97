import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, reference.py
# The tests hold sam_mlx to float32 references computed on the CPU and check the GPU's branches on the CPU device
# (helpers.gpu_branches); on a Mac they run on MLX's CPU too (this process and the commands it starts), so a test
# never fails for the device. scripts/device_check.py measures a real GPU.
os.environ.setdefault("SAM_MLX_DEVICE", "cpu")

import sam_mlx  # noqa: E402,F401  (loads OpenBLAS before anything imports mlx)


@pytest.fixture(autouse=True, scope="session")
def _private_model_cache(tmp_path_factory):
    """Converted checkpoints go to a throwaway cache, not the user's ~/.cache."""
    os.environ["SAM_MLX_CACHE"] = str(tmp_path_factory.mktemp("sam_mlx_cache"))
    yield

