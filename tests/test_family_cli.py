"""`sam-mlx segment` and `everything` with the SAM family's models: HQ-SAM (a small ViT and Light HQ-SAM's TinyViT,
original .pth files) and SlimSAM-77's widths (a transformers file), random weights, on a shared photo at
``--sizing stretch --size 256`` (the command's path, not the weights' numbers, is what is checked here; the
parity tests hold the numbers). In-process, to spare a Python and MLX start-up per run.
"""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from helpers import IMAGES
from reference import build_reference_hq_sam
from sam_mlx import cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("family_models")
    paths = {"hq_vit": folder / "sam_hq_small.pth", "hq_tiny": folder / "sam_hq_vit_tiny.pth"}
    small = dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=14)
    torch.save(build_reference_hq_sam("vit", **small).state_dict(), paths["hq_vit"])
    torch.save(build_reference_hq_sam("tiny_vit").state_dict(), paths["hq_tiny"])
    torch.manual_seed(0)
    config = transformers.SamConfig(vision_config=dict(hidden_size=168, mlp_dim=696, num_hidden_layers=4,
                                                       global_attn_indexes=[1, 3]))
    transformers.SamModel(config).save_pretrained(folder / "slimsam")
    paths["slimsam"] = folder / "slimsam" / "model.safetensors"
    return paths


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


SIZE = ["--sizing", "stretch", "--size", "256"]


@pytest.mark.parametrize("model", ["hq_vit", "hq_tiny", "slimsam"])
def test_segment(checkpoints, tmp_path, model):
    out = tmp_path / "out"
    args = ["segment", str(IMAGES / "truck.jpg"), "--point", "500,375", "--box", "425,600,700,875", "--model",
            str(checkpoints[model]), *SIZE, "--out-dir", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "truck.json").read_text())
    hq = model.startswith("hq")
    assert len(report["masks"]) == 1  # a box and a point: one mask (HQ-SAM: always one)
    assert report["model"].startswith("hq_" if hq else "vit_custom")
    mask = np.asarray(Image.open(out / report["masks"][0]["file"]))
    assert mask.shape == (1200, 1800)
    if hq:  # the HQ mask alone is another mask
        assert cli.main([*args[:-2], "--hq-token-only", "--out-dir", str(tmp_path / "hq_only")]) == 0
        only = json.loads((tmp_path / "hq_only" / "truck.json").read_text())["masks"][0]
        assert only["segmentation"] != report["masks"][0]["segmentation"]


def test_hq_token_only_needs_an_hq_model(checkpoints, tmp_path, capsys):
    code = cli.main(["segment", str(IMAGES / "truck.jpg"), "--point", "500,375", "--model",
                     str(checkpoints["slimsam"]), *SIZE, "--hq-token-only", "--out-dir", str(tmp_path)])
    assert code != 0 and "--hq-token-only needs an HQ-SAM model" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["hq_vit", "hq_tiny", "slimsam"])
def test_everything(checkpoints, tmp_path, model):
    out = tmp_path / "out"
    args = ["everything", str(IMAGES / "dog.jpg"), "--model", str(checkpoints[model]), *SIZE, "--points-per-side",
            "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--out-dir", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "dog.json").read_text())
    # 16 points; HQ-SAM gives one mask per point, SAM three (before NMS)
    assert 1 <= len(report["annotations"]) <= (16 if model.startswith("hq") else 48)
    assert (out / "dog_overlay.png").is_file()
