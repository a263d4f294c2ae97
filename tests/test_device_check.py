"""scripts/device_check.py runs end to end on tiny shapes (--quick) and writes its report after every step."""

import json
import subprocess
import sys

from helpers import ROOT

SCRIPT = ROOT / "scripts" / "device_check.py"


def run(tmp_path, *args: str) -> dict:
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def test_device_check_reports_every_step_on_tiny_shapes(tmp_path):
    report = run(tmp_path)
    assert list(report) == ["environment", "precision", "tf32", "timings", "memory", "threads"]
    assert not any("error" in step or "skipped" in step for step in report.values()), report
    assert report["environment"]["device"] in ("cpu", "gpu") and report["environment"]["mlx"]
    for shape in ("vit_b_shaped", "vit_h_shaped"):
        runs = dict(report["precision"][shape])
        assert runs.pop("cpu_float32_seconds") > 0 and set(runs) == {"float32", "bfloat16", "float16"}
        assert all(r["finite"] and r["best_mask_iou_min"] >= 0.9 for r in runs.values()), runs
        assert runs["float16"]["tokens_max_rel"] < runs["bfloat16"]["tokens_max_rel"] < 0.05  # 3 more bits
    for setting in ("MLX_ENABLE_TF32=0", "MLX_ENABLE_TF32=1"):
        assert report["tf32"][setting]["best_mask_iou_min"] >= 0.9
    for timing in report["timings"].values():
        assert {"encode", "prompt_3_masks", "prompt_1_mask", "prompt_with_hint", "batch_of_16"} <= timing.keys()
        assert all(0 < timing[k] < 60 for k in ("encode", "prompt_3_masks"))
    for measured in report["memory"].values():
        assert 0 < measured["peak_bytes"] < measured["estimate_bytes"]
    threads = report["threads"]
    assert threads["worker_encoding_equal"] and threads["decodes_meanwhile_equal"] and threads["short_lived_equal"]


def test_steps_past_the_budget_are_recorded_as_skipped(tmp_path):
    report = run(tmp_path, "--budget", "0")
    assert report and all(step == {"skipped": "past the time budget (--budget)"} for step in report.values())
