"""scripts/benchmark.py runs end to end (MobileSAM, one encoding, no segment-everything) and reports
sam_mlx against PyTorch, without touching the caller's model cache. Its timings are not checked here."""

import json
import os
import subprocess
import sys

import pytest

from helpers import MOBILE_SAM, ROOT


def test_benchmark_runs_and_reports_ratios(tmp_path):
    assert MOBILE_SAM.is_file()
    user_cache = tmp_path / "user_cache"
    user_cache.mkdir()
    out = tmp_path / "bench.json"
    env = {**os.environ, "SAM_MLX_CACHE": str(user_cache)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--models", "mobile_sam", "--runs", "1",
         "--no-everything", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert run.returncode == 0, run.stderr
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    for name in ("prompt -> masks at original size", "prompt -> masks, no low-res logits (return_low_res=False)",
                 "prompt -> 1 mask (multimask_output=False)", "prompt + mask hint -> 1 mask (refinement)"):
        row = rows[name]
        assert row["sam_mlx"] > 0 and row["pytorch"] > 0
        assert abs(row["ratio"] - row["sam_mlx"] / row["pytorch"]) < 1e-9
    # without low-res logits, sam_mlx is set against the original's one predict, which returns them
    assert rows["prompt -> masks, no low-res logits (return_low_res=False)"]["pytorch"] == rows[
        "prompt -> masks at original size"]["pytorch"]
    assert rows["image encoding 1024"]["sam_mlx"] > 0 and rows["peak RSS (load + encode)"]["sam_mlx"] > 100
    assert "| mobile_sam | prompt -> masks at original size (ms) |" in run.stdout
    assert list(user_cache.iterdir()) == []  # conversions went to the run's own temporary cache


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "scripts").glob("*.py")))
def test_every_script_starts(script):
    """Each script's imports resolve (scripts reach into tests/ for shared helpers): --help runs."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "usage" in result.stdout, result.stderr[-2000:]
