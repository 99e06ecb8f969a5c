"""Seed 001's detector on the shared harness: learning, COCO folders, torchrun (its kill and
resume is one case of tests/test_train.py's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from examples.detector_neck import train
from examples.detector_neck.data import DigitsCanvas, collate_detection, write_coco
from examples.detector_neck.models import NECKS, build_ssd
from examples.harness.distributed import Dist
from torch.utils.data import DataLoader

from run_helpers import REPO, subprocess_env

SIZE = 64


def _flags(out: Path, *extra: str, neck: str = "fpn_bilinear", epochs: int = 1,
           limit: int = 32) -> list[str]:
    return ["--neck", neck, "--dataset", "digits-canvas", "--backbone", "efficientnet_tiny",
            "--image-size", str(SIZE), "--batch-size", "16", "--lr", "3e-3", "--limit",
            str(limit), "--epochs", str(epochs), "--device", "cpu", "--out", str(out),
            "--quiet", *extra]


_env = subprocess_env


def _script(*args: str) -> list[str]:
    return [sys.executable, "-m", "examples.detector_neck.train", *args]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _untrained_map50(neck: str, num_classes: int, test) -> float:
    """mAP@0.5 of the model the run starts from (same seed, same factory), on the same data."""
    torch.manual_seed(0)
    model = build_ssd(neck, num_classes, (SIZE, SIZE), "efficientnet_tiny").eval()
    scores = train.TASK.evaluator(num_classes, torch.device("cpu"),
                                  lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=16, collate_fn=collate_detection):
            scores.update(model, *batch)
    return scores.compute(Dist(0, 1, 0, torch.device("cpu")))["map50"]


def _config_like(out: Path):
    from examples.harness.config import TrainConfig

    return TrainConfig(model="fpn_bilinear", out=out, dataset="digits-canvas", image_size=SIZE,
                       limit=192)


@pytest.mark.slow
def test_short_run_learns_to_detect_digits(tmp_path):
    torch.set_num_threads(1)
    neck = "fpn_bilinear"
    assert train.main(_flags(tmp_path, neck=neck, epochs=5, limit=192)) == 0
    metrics = _metrics(tmp_path)
    assert metrics["task"] == "detection"
    _, test, classes = train.TASK.datasets(_config_like(tmp_path))
    before = _untrained_map50(neck, len(classes), test)
    after = metrics["final"]["best_map50"]
    # Untrained, the detector scores about 2e-5 here; five epochs on 192 canvases reach 0.015
    # to 0.04 (a from-scratch backbone: the floor is set well under that, the ratio far over 1).
    assert after > max(0.008, 10 * before), (before, after)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["best"]["map50"] == after


@pytest.mark.slow
def test_coco_folder_trains(tmp_path):
    root = tmp_path / "coco"
    for split, count in (("train", 24), ("val", 8)):
        write_coco(DigitsCanvas(split, count=count), root, split)
    out = tmp_path / "run"
    flags = ["--neck", "bifpn", "--data", str(root), "--backbone", "efficientnet_tiny",
             "--image-size", str(SIZE), "--batch-size", "8", "--epochs", "1", "--device",
             "cpu", "--out", str(out), "--quiet"]
    assert train.main(flags) == 0
    metrics = _metrics(out)
    assert (metrics["train_samples"], metrics["test_samples"]) == (24, 8)
    assert metrics["history"][0]["test_images"] == 8
    assert 0.0 <= metrics["final"]["map50"] <= 1.0
    assert metrics["config"]["dataset"] == "coco"


def test_missing_coco_annotations_stop_with_the_file_named(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    code = train.main(["--neck", "width", "--data", str(tmp_path), "--out",
                       str(tmp_path / "run"), "--quiet", "--backbone", "efficientnet_tiny"])
    assert code == 2
    assert "instances_train.json" in capsys.readouterr().err


def test_missing_weights_file_is_refused(tmp_path, capsys):
    code = train.main(_flags(tmp_path / "run", "--weights", str(tmp_path / "nope.pt")))
    assert code == 2
    assert "nope.pt" in capsys.readouterr().err


def test_default_image_is_the_study_size():
    from examples.harness.config import TrainConfig

    config = TrainConfig(model="bifpn", out=Path("x"), image_size=512,
                         options={"image_width": 640})
    assert train.image_size(config) == (512, 640)
    assert train.image_size(TrainConfig(model="bifpn", out=Path("x"), image_size=96)) == (96, 96)


@pytest.mark.slow
@pytest.mark.parametrize("neck", sorted(NECKS))
def test_torchrun_two_processes(tmp_path, neck):
    flags = [f for f in _flags(tmp_path, neck=neck, limit=16) if f != "--quiet"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "examples.detector_neck.train", *flags]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(tmp_path)
    assert metrics["world_size"] == 2
    assert metrics["history"][0]["test_images"] == metrics["test_samples"]
    assert "0 of" in result.stdout + result.stderr  # the probe found every parameter used
