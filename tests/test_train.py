"""The training harness end to end: learning, kill-and-resume, torchrun, refused checkpoints.

Runs use scikit-learn's bundled digits at 16x16 and the cheapest study network (ResNet50 with
halved widths); the torchrun test runs every study network. The kill-and-resume test runs every
task's script (classification with and without CutMix, detection, segmentation), with DataLoader
workers. Subprocess runs get one OpenMP thread each, so two of them share two cores.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from examples.dfpn_classifier import train
from examples.dfpn_classifier.models import MODELS
from examples.harness import TrainConfig, fit
from examples.harness import loop as harness_loop
from examples.harness.checkpoint import FORMAT
from examples.harness.distributed import Dist
from examples.harness.tasks import ClassificationTask
from torch.utils.data import Dataset

from run_helpers import REPO, kill_after_first_checkpoint, subprocess_env

MODEL = "resnet50"


# Small models on a shared 2-core machine run faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def _flags(out: Path, *extra: str, epochs: int = 1, limit: int = 32, model: str = MODEL
           ) -> list[str]:
    return ["--model", model, "--dataset", "digits", "--image-size", "16", "--batch-size", "16",
            "--limit", str(limit), "--epochs", str(epochs), "--out", str(out), "--quiet", *extra]


_env = subprocess_env


def _script(*args: str) -> list[str]:
    return [sys.executable, "-m", "examples.dfpn_classifier.train", *args]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A one-epoch run's output folder (checkpoint.pt, metrics.json, curves.png)."""
    out = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    assert train.main(_flags(out)) == 0
    return out


def test_outputs_of_a_run(finished_run):
    assert sorted(p.name for p in finished_run.iterdir()) == [
        "best.pt", "checkpoint.pt", "curves.png", "metrics.json"]
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1]
    assert metrics["final"]["test_acc"] == metrics["history"][-1]["test_acc"]
    assert metrics["history"][0]["test_images"] == metrics["test_samples"]
    assert (finished_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert (state["format"], state["model"], state["epoch"]) == (FORMAT, MODEL, 1)
    assert state["num_classes"] == metrics["num_classes"]


def test_best_checkpoint_holds_the_best_epoch(tmp_path):
    torch.set_num_threads(1)
    assert train.main(_flags(tmp_path, "--lr", "0.02", epochs=3, limit=64)) == 0
    history = _history(tmp_path)
    accuracies = [h["test_acc"] for h in history]
    best_epoch = accuracies.index(max(accuracies)) + 1  # the first of equal ones
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch and best["best"] == {"test_acc": max(accuracies)}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["final"]["best_epoch"], metrics["final"]["best_test_acc"]) == (
        best_epoch, max(accuracies))
    last = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model_state"]
    same = all(torch.equal(best["model_state"][k], v) for k, v in last.items())
    assert same == (best_epoch == len(history))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_checkpoint_is_refused_and_kept(finished_run, tmp_path, capsys, damage):
    good = (finished_run / "checkpoint.pt").read_bytes()
    bad = {"garbage": b"not a checkpoint", "truncated": good[: len(good) // 2], "empty": b""}
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bad[damage])
    assert train.main(_flags(tmp_path, "--resume", epochs=2)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err
    assert path.read_bytes() == bad[damage]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def _foreign(finished_run: Path, tmp_path: Path, **changes: object) -> Path:
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    torch.save({**state, **changes}, tmp_path / "checkpoint.pt")
    return tmp_path / "checkpoint.pt"


def test_foreign_checkpoint_is_refused(finished_run, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((finished_run / "checkpoint.pt").read_bytes())
    other = next(name for name in MODELS if name != MODEL)
    assert train.main(_flags(tmp_path, "--resume", epochs=2, model=other)) == 2
    assert "another run" in capsys.readouterr().err
    assert path.read_bytes() == (finished_run / "checkpoint.pt").read_bytes()


def test_checkpoint_with_other_class_count_is_refused(finished_run, tmp_path, capsys):
    classes = json.loads((finished_run / "metrics.json").read_text())["num_classes"]
    before = _foreign(finished_run, tmp_path, num_classes=classes + 1).read_bytes()
    assert train.main(_flags(tmp_path, "--resume", epochs=2)) == 2
    assert f"{classes + 1} classes" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_foreign_file_is_refused(tmp_path, capsys):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train.main(_flags(tmp_path, "--resume")) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_existing_checkpoint_is_not_overwritten_without_resume(finished_run, tmp_path, capsys):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((finished_run / "checkpoint.pt").read_bytes())
    assert train.main(_flags(tmp_path)) == 2
    assert "--resume" in capsys.readouterr().err
    assert path.read_bytes() == (finished_run / "checkpoint.pt").read_bytes()


def test_resume_of_a_finished_run_trains_nothing(finished_run, tmp_path):
    for name in ("checkpoint.pt", "metrics.json"):
        (tmp_path / name).write_bytes((finished_run / name).read_bytes())
    assert train.main(_flags(tmp_path, "--resume")) == 0
    assert _history(tmp_path) == _history(finished_run)


class _Draws(Dataset):
    """Item ``i`` is a random draw of the process that reads it (a worker's RNG), and ``i``."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(2), index


def test_train_workers_draw_from_the_seed_and_the_epoch_alone():
    """Epoch 1's draws in two workers are the same after any epochs and any global RNG state."""
    config = TrainConfig(model=MODEL, out=Path("unused"), workers=2, batch_size=4, seed=3)
    info = Dist(0, 1, 0, torch.device("cpu"))
    loader, sampler, _ = harness_loop._loaders(_Draws(), _Draws(), config, info,
                                               ClassificationTask())

    def epoch(e: int) -> torch.Tensor:
        harness_loop._start_epoch(loader, sampler, config.seed, e, info.rank)
        return torch.cat([draws for draws, _ in loader])

    first = epoch(1)
    torch.manual_seed(123)
    epoch(0)
    assert torch.equal(epoch(1), first)
    assert not torch.equal(epoch(2), first)
    assert harness_loop.worker_seed(3, 1) != harness_loop.worker_seed(3, 1, rank=1)


def test_amp_and_channels_last(tmp_path):
    config = TrainConfig(model=MODEL, out=tmp_path, dataset="digits", image_size=16, limit=32,
                         batch_size=16, epochs=1, amp=True, channels_last=True, quiet=True,
                         checkpoint=False)
    final = fit(config, MODELS[MODEL])["final"]
    assert torch.isfinite(torch.tensor([final["train_loss"], final["test_loss"]])).all()
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.slow
def test_training_on_digits_learns(tmp_path):
    config = TrainConfig(model=MODEL, out=tmp_path, dataset="digits", image_size=16, epochs=2,
                         quiet=True, checkpoint=False)
    metrics = fit(config, MODELS[MODEL])
    chance = 1 / metrics["num_classes"]
    assert metrics["final"]["test_acc"] > 3 * chance
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]


# One small run per task, each with two DataLoader workers: the train data's random draws
# (crops, flips, CutMix, the photometric distortion) are made in the workers.
KILL_AND_RESUME = {
    "classification-0-workers": ("examples.dfpn_classifier.train", [
        "--model", MODEL, "--dataset", "digits", "--image-size", "16", "--batch-size", "16",
        "--limit", "128", "--workers", "0"]),
    "classification-cutmix": ("examples.resizer_classifier.train", [
        "--model", "vgg16_resizer_cbam", "--dataset", "digits", "--arch", "vgg_tiny",
        "--output-size", "32", "--image-size", "8", "--batch-size", "16", "--limit", "160",
        "--workers", "2"]),
    "detection": ("examples.detector_neck.train", [
        "--neck", "fpn_bilinear", "--dataset", "digits-canvas", "--backbone",
        "efficientnet_tiny", "--image-size", "48", "--batch-size", "8", "--limit", "64",
        "--workers", "2"]),
    "segmentation": ("examples.dilatednet.train", [
        "--dataset", "digits-canvas", "--image-size", "40", "--width", "4", "--fc-channels",
        "32", "--optimizer", "adamw", "--batch-size", "8", "--limit", "128", "--workers", "2"]),
}


def _numbers(tree: object, path: str = "") -> dict[str, float]:
    """Every number in a metrics.json tree by its path, the timings (``seconds``) aside."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() if key != "seconds"
                for k, v in _numbers(value, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree)
                for k, v in _numbers(value, f"{path}/{i}").items()}
    number = isinstance(tree, (int, float)) and not isinstance(tree, bool)
    return {path: tree} if number else {}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(KILL_AND_RESUME))
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, case):
    """Killed in epoch 2 and resumed, a run writes the metrics.json of an uninterrupted one,
    every number equal (the seconds aside), also when the random draws happen in workers."""
    module, flags = KILL_AND_RESUME[case]
    epochs = 2
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", module, *flags, "--epochs", str(epochs), "--device", "cpu",
                "--out", str(out), "--quiet", *extra]

    reference = subprocess.Popen(command(straight), cwd=REPO, env=_env())
    kill_after_first_checkpoint(command(killed), killed, epochs, timeout=240)
    subprocess.run(command(killed, "--resume"), cwd=REPO, env=_env(), check=True, timeout=300)
    assert reference.wait(timeout=300) == 0
    resumed = json.loads((killed / "metrics.json").read_text())
    plain = json.loads((straight / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, epochs + 1))
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == epochs
    assert _numbers(resumed) == _numbers(plain)
    assert sorted(p.name for p in killed.iterdir() if not p.name.endswith(".tmp")) == [
        "best.pt", "checkpoint.pt", "curves.png", "metrics.json"]


def _params_without_grad(model: str, num_classes: int) -> int:
    """Trainable parameter tensors that one backward pass through ``model`` leaves at None."""
    net = MODELS[model](num_classes=num_classes)
    net(torch.rand(2, 3, 16, 16)).sum().backward()
    return sum(p.grad is None for p in net.parameters() if p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
def test_torchrun_two_processes_on_cpu(tmp_path, model):
    """Every model trains under DDP, also those with parameters that get no gradient (the FPN
    smoothing convs of the levels coarser than the pooled P2)."""
    flags = [f for f in _flags(tmp_path, "--device", "cpu", "--batch-size", "4", epochs=2,
                               limit=16, model=model) if f != "--quiet"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "examples.dfpn_classifier.train", *flags]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "checkpoint.pt", "curves.png", "metrics.json"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    history = metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    # every image is counted once over the two ranks: the sums were reduced
    assert {h["test_images"] for h in history} == {metrics["test_samples"]}
    assert {h["train_images"] for h in history} == {metrics["train_samples"]}
    # rank 0 alone says how many parameter tensors get no gradient, and the count is right
    lines = re.findall(r"(\d+) of (\d+) parameter tensors get no gradient", result.stdout)
    total = sum(1 for p in MODELS[model]().parameters() if p.requires_grad)
    expected = _params_without_grad(model, metrics["num_classes"])
    assert lines == [(str(expected), str(total))], result.stdout[-2000:]


def test_table2_rows_and_printout(tmp_path, capsys):
    from examples.dfpn_classifier.table2 import PAPER_TABLE2, print_table2, run_table2

    rows = run_table2(tmp_path, epochs=1, image_size=16, limit=32, models=[MODEL])
    assert [row["model"] for row in rows] == [MODEL]
    assert (tmp_path / MODEL / "curves.png").exists()
    assert not (tmp_path / MODEL / "checkpoint.pt").exists()
    print_table2(rows + [{**rows[0], "model": name} for name in PAPER_TABLE2 if name != MODEL])
    text = capsys.readouterr().out
    for paper in PAPER_TABLE2.values():
        assert f"{paper['loss']:.3f}" in text and f"{paper['accuracy']:.0f}%" in text
    assert f"{100 * rows[0]['test_acc']:.1f}%" in text and "100 epochs" in text


@pytest.mark.slow
def test_compile_flag_compiles_and_checkpoints_plain_weights(tmp_path, monkeypatch):
    """--compile goes through torch.compile (eager backend here, to spare CI the C++ build)."""
    calls = []
    real_compile = torch.compile

    def spy(model, **kwargs):
        calls.append(model)
        return real_compile(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    config = TrainConfig(model=MODEL, out=tmp_path, dataset="digits", image_size=16, limit=32,
                         batch_size=16, epochs=1, compile=True, quiet=True)
    final = fit(config, MODELS[MODEL])["final"]
    assert len(calls) == 1 and torch.isfinite(torch.tensor(final["train_loss"]))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    fresh = MODELS[MODEL](num_classes=10)
    fresh.load_state_dict(state["model_state"])
