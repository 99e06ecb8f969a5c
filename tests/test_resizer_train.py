"""Seed 003's training: the study's recipe on the harness (CutMix with probability p, soft-target
loss, the step schedule and its resumes), the train script and the demo section.

Runs use scikit-learn's digits at their native 8x8, enlarged to 32x32 by the narrow ``vgg_tiny``.
Expected rates come from PyTorch's ``MultiStepLR`` or the formula written out here, not from the
harness's schedule code.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from examples.harness import TrainConfig, fit
from examples.harness import loop as harness_loop
from examples.harness.checkpoint import CheckpointError
from examples.harness.schedule import (
    CosineSchedule,
    StepSchedule,
    make_schedule,
    resumed_schedule,
    schedule_from_state_dict,
)
from examples.harness.tasks import ClassificationTask
from examples.resizer_classifier import demo, figure, train
from examples.resizer_classifier.data import IMAGENET_MEAN, IMAGENET_STD, RandomCutMix
from examples.resizer_classifier.models import MODELS

TINY = ["--arch", "vgg_tiny", "--output-size", "32", "--image-size", "8"]


# Small models on a shared 2-core machine run faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")


def _flags(out: Path, *extra: str, model: str = "vgg16_resizer_cbam", epochs: int = 1,
           limit: int = 32) -> list[str]:
    return ["--model", model, "--dataset", "digits", *TINY, "--batch-size", "16", "--limit",
            str(limit), "--epochs", str(epochs), "--out", str(out), "--quiet", *extra]


def _history(out: Path) -> list[dict]:
    return json.loads((out / "metrics.json").read_text())["history"]


# --- data ------------------------------------------------------------------------------------


def _padded_crops(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop of ``image``'s size from ``image`` padded with black, and their mirrors."""
    size = image.shape[-1]
    padded = F.pad(image, [padding] * 4)
    crops = [padded[:, y:y + size, x:x + size] for y in range(2 * padding + 1)
             for x in range(2 * padding + 1)]
    return crops + [crop.flip(-1) for crop in crops]


@pytest.mark.parametrize("hflip", [True, False])
def test_recipe_transforms(tmp_path, hflip):
    from examples.harness.data import digits
    from examples.resizer_classifier.data import build_datasets

    size = 16
    config = train.recipe_config("vgg16", tmp_path, dataset="digits", image_size=size,
                                 options={"hflip": hflip})
    train_set, test_set, classes = build_datasets(config)
    raw_train, raw_test, raw_classes = digits(size)
    assert classes == raw_classes and len(test_set) == len(raw_test)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    for i in (0, 7, 100):
        image, label = test_set[i]
        assert torch.allclose(image, (raw_test[i][0] - mean) / std) and label == raw_test[i][1]
    flipped = 0
    for i in range(40):
        image, label = train_set[i]
        shown = image * std + mean
        candidates = _padded_crops(raw_train[i][0], size // 8)
        matches = [j for j, c in enumerate(candidates) if torch.allclose(shown, c, atol=1e-5)]
        assert matches and label == raw_train[i][1]
        flipped += min(matches) >= len(candidates) // 2
    assert (flipped > 5) if hflip else (flipped == 0)


# --- CutMix --------------------------------------------------------------------------------


class _Counting:
    """Stands in for ``RandomCutMix.cutmix``: counts the batches it is asked to mix."""

    def __init__(self, cutmix) -> None:
        self.cutmix = cutmix
        self.calls = 0

    def __call__(self, images, labels):
        self.calls += 1
        return self.cutmix(images, labels)


def _mixed_flags(p: float, batches: int, seed: int) -> list[bool]:
    mix = RandomCutMix(10, p=p)
    mix.cutmix = counter = _Counting(mix.cutmix)
    torch.manual_seed(seed)
    flags = []
    for _ in range(batches):
        before = counter.calls
        images, labels = torch.rand(2, 3, 4, 4), torch.randint(0, 10, (2,))
        out_images, targets = mix(images, labels)
        assert targets.shape == (2, 10) and targets.dtype == torch.float32
        flags.append(counter.calls > before)
        if not flags[-1]:
            assert out_images is images
            assert torch.equal(targets, F.one_hot(labels, 10).float())
    return flags


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_cutmix_is_applied_with_the_configured_probability(p):
    batches = 2000
    flags = _mixed_flags(p, batches, seed=3)
    tolerance = 4 * math.sqrt(batches * p * (1 - p))
    assert abs(sum(flags) - batches * p) < tolerance
    assert _mixed_flags(p, batches, seed=3) == flags  # torch's RNG decides: reproducible


def test_cutmix_p0_never_mixes_and_p1_always_does():
    assert not any(_mixed_flags(0.0, 500, seed=0))
    assert all(_mixed_flags(1.0, 200, seed=0))


def test_a_mixed_batch_pastes_a_box_and_mixes_targets_by_its_area():
    torch.manual_seed(1)
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for _ in range(10):
        mixed, targets = RandomCutMix(10, p=1.0)(images, labels)
        pasted = (mixed != images).any(1)  # (N, H, W): pixels taken from the rolled batch
        assert torch.equal(mixed[:, :, pasted[0]], images.roll(1, 0)[:, :, pasted[0]])
        area = pasted[0].float().mean()
        assert torch.allclose(targets.sum(1), torch.ones(4))
        assert torch.allclose(targets[torch.arange(4), labels], 1 - area.expand(4), atol=1e-6)
        assert torch.allclose(targets[torch.arange(4), labels.roll(1)], area.expand(4),
                              atol=1e-6)


def test_task_builds_cutmix_from_the_options(tmp_path):
    def config(p: float) -> TrainConfig:
        return train.recipe_config("vgg16", tmp_path, dataset="digits", image_size=8, limit=16,
                                   options={"cutmix_p": p, "cutmix_alpha": 0.5})

    task = train.ResizerTask()
    _, _, classes = task.datasets(config(0.3))
    assert (task.mix.p, task.mix.alpha, task.mix.num_classes) == (0.3, 0.5, len(classes))
    task.datasets(config(0.0))
    assert task.mix is None
    batch = task.collate([(torch.rand(3, 8, 8), torch.tensor(4))] * 2, train=True)
    assert torch.equal(batch[1], torch.tensor([4, 4]))  # p = 0: hard labels, untouched


def test_soft_targets_train_a_step():
    torch.manual_seed(0)
    net = MODELS["vgg16_resizer_cbam"](num_classes=10, output_size=32, arch="vgg_tiny").eval()
    images, targets = RandomCutMix(10, p=1.0)(torch.rand(4, 3, 8, 8), torch.arange(4))
    assert (targets.max(1).values < 1).any(), "the batch should hold mixed targets"
    with torch.no_grad():
        expected = -(targets * net(images).log_softmax(1)).sum(1).mean()
    loss, correct = ClassificationTask().train_loss(net, images, targets,
                                                    contextlib.nullcontext)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 <= int(correct) <= 4
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


# --- the step schedule ------------------------------------------------------------------------


def _multistep_rates(lr: float, milestones: list[int], gamma: float, epochs: int) -> list[float]:
    """PyTorch's MultiStepLR, stepped once per epoch: the rate each epoch trains at."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_step_schedule_is_the_study_recipe():
    rates = [0.01 * StepSchedule((100, 150), 0.1, 300).scale(e) for e in range(300)]
    assert rates == pytest.approx(_multistep_rates(0.01, [100, 150], 0.1, 300), rel=1e-12)
    assert rates[:100] == pytest.approx([0.01] * 100)
    assert rates[100:150] == pytest.approx([1e-3] * 50)
    assert rates[150:] == pytest.approx([1e-4] * 150)


def test_step_schedule_state_resume_and_refusals():
    s = make_schedule(6, [2, 4], 0.5)
    assert isinstance(s, StepSchedule) and isinstance(make_schedule(6), CosineSchedule)
    assert schedule_from_state_dict(s.state_dict()) == s
    longer = resumed_schedule(s, 3, 9, [2, 4], 0.5)
    assert [longer.scale(e) for e in range(9)] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25]
    for milestones, gamma in (([2, 5], 0.5), ([2, 4], 0.1), ([], 0.5)):
        with pytest.raises(ValueError, match="--lr-milestones 2 4 --lr-gamma 0.5"):
            resumed_schedule(s, 3, 6, milestones, gamma)
    with pytest.raises(ValueError, match="the cosine schedule"):
        resumed_schedule(CosineSchedule.over(6), 3, 6, [2], 0.1)
    for bad in ((), (0, 2), (3, 3), (4, 2)):
        with pytest.raises(ValueError, match="milestones must be increasing"):
            StepSchedule(bad, 0.1, 5)


class _Stop(Exception):
    pass


def test_resume_across_a_milestone_follows_the_steps(tmp_path, monkeypatch):
    used: list[float] = []
    stop_after: list[int | None] = [2]
    real = harness_loop.train_one_epoch

    def spy(net, loader, optimizer, *args):
        if stop_after[0] is not None and len(used) >= stop_after[0]:
            raise _Stop
        used.append(optimizer.param_groups[0]["lr"])
        return real(net, loader, optimizer, *args)

    monkeypatch.setattr(harness_loop, "train_one_epoch", spy)
    config = train.recipe_config(
        "vgg16", tmp_path, dataset="digits", image_size=8, limit=16, batch_size=16, epochs=4,
        lr_milestones=[2, 3], quiet=True, options={"arch": "vgg_tiny", "output_size": 32})
    factory = train.model_factory("vgg16", arch="vgg_tiny", output_size=32)
    with pytest.raises(_Stop):
        fit(config, factory, task=train.ResizerTask())
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
    stop_after[0] = None
    config.resume = True
    fit(config, factory, task=train.ResizerTask())
    expected = _multistep_rates(0.01, [2, 3], 0.1, 4)
    assert expected == pytest.approx([0.01, 0.01, 1e-3, 1e-4])
    assert used == pytest.approx(expected, rel=1e-12)
    assert [h["lr"] for h in _history(tmp_path)] == used
    optimizer = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["optimizer_state"]
    group = optimizer["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, False, 5e-4)


# --- the script ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, str]:
    """A one-epoch run of the script (output folder, its stdout)."""
    out = tmp_path_factory.mktemp("finished")
    torch.set_num_threads(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main(_flags(out)) == 0
    return out, printed.getvalue()


def test_run_prints_and_records_arch_and_output_size(finished):
    out, printed = finished
    assert ("vgg16_resizer_cbam: arch vgg_tiny behind Resizer_CBAM, 8x8 -> 32x32, CutMix p=0.5, "
            "random init") in printed.splitlines()
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "checkpoint.pt", "curves.png", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    options = metrics["config"]["options"]
    assert (options["arch"], options["output_size"], options["cutmix_p"]) == ("vgg_tiny", 32, 0.5)
    config = metrics["config"]
    assert (config["optimizer"], config["lr"], config["nesterov"], config["batch_size"]) == (
        "sgd", 0.01, False, 16)
    assert config["lr_milestones"] == [100, 150] and config["lr_gamma"] == 0.1
    assert torch.load(out / "best.pt", weights_only=True)["config"]["options"] == options


def test_figure_rebuilds_the_model_from_the_checkpoint(finished, tmp_path, monkeypatch):
    out, _ = finished
    drawn = []
    real = figure.resizer_figure

    def spy(model, images, path, **kwargs):
        drawn.append((model, images, kwargs))
        return real(model, images, path, **kwargs)

    monkeypatch.setattr(figure, "resizer_figure", spy)
    path = tmp_path / "fig.png"
    assert figure.main(["--checkpoint", str(out / "best.pt"), "--count", "2",
                        "--out", str(path)]) == 0
    (model, images, kwargs), = drawn
    assert (model.arch, model.output_size, images.shape) == ("vgg_tiny", (32, 32), (2, 3, 8, 8))
    assert (kwargs["mean"], kwargs["std"]) == (IMAGENET_MEAN, IMAGENET_STD)
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model_state"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert matplotlib.image.imread(path).std() > 0


def test_resume_of_a_finished_run_trains_nothing(finished, tmp_path, monkeypatch):
    out, _ = finished
    for name in ("checkpoint.pt", "metrics.json"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    trained = []
    monkeypatch.setattr(harness_loop, "train_one_epoch", lambda *args: trained.append(args))
    assert train.main(_flags(tmp_path, "--resume")) == 0
    assert trained == [] and _history(tmp_path) == _history(out)


def test_resume_with_other_milestones_is_refused(finished, tmp_path, capsys):
    out, _ = finished
    (tmp_path / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert train.main(_flags(tmp_path, "--resume", "--lr-milestones", "50", epochs=2)) == 2
    err = capsys.readouterr().err
    assert "--lr-milestones 100 150 --lr-gamma 0.1" in err and "Traceback" not in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(("flags", "message"), [
    (["--output-size", "16"], "must be >= 32"),
    (["--lr-milestones", "150", "100"], "must rise strictly"),
    (["--cutmix-p", "1.5"], r"must lie in \[0, 1\]"),
])
def test_bad_flags_are_refused(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train.main(_flags(tmp_path, *flags))
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_missing_weights_file_is_refused(tmp_path, capsys):
    missing = tmp_path / "vgg16.pt"
    assert train.main(_flags(tmp_path / "run", "--weights", str(missing))) == 2
    assert str(missing) in capsys.readouterr().err


def test_weights_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match=f"--weights {bad}"):
        train.model_factory("vgg16", arch="vgg_tiny", output_size=32, weights=bad)(10)


@pytest.mark.slow
def test_short_run_on_digits_learns(tmp_path):
    flags = ["--model", "vgg16", "--dataset", "digits", *TINY, "--batch-size", "32",
             "--epochs", "3", "--optimizer", "adamw", "--lr", "1e-3", "--weight-decay", "0.01",
             "--lr-milestones", "--no-hflip", "--cutmix-p", "0", "--out", str(tmp_path),
             "--quiet"]
    assert train.main(flags) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    chance = 1 / metrics["num_classes"]
    history = metrics["history"]
    assert history[-1]["test_acc"] > 3 * chance
    assert history[-1]["train_loss"] < history[0]["train_loss"]


# --- the demo ------------------------------------------------------------------------------


def test_demo_section_at_a_small_scale(tmp_path, capsys):
    torch.set_num_threads(2)
    demo.run(tmp_path, epochs=1, limit=16)
    assert torch.get_num_threads() == 2  # the section's one thread is given back
    text = capsys.readouterr().out
    for title, name, cutmix in demo.CONFIGS:
        row = next(line for line in text.splitlines() if line.startswith(title + " "))
        assert f"{demo.PAPER_TABLE1[name, cutmix]:.2f}%" in row
    assert "300 epochs" in text and "V100" in text and "vgg_tiny" in text
    assert "8x8 -> 32x32" in text and "1 epoch," in text and "16 train images" in text
    path = tmp_path / "resizer_figure.png"
    assert str(path) in text and matplotlib.image.imread(path).std() > 0


def test_trains_and_resumes_on_an_image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "pictures"
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("test", 2)):
        for label, colour in (("red", 0), ("green", 1)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.rand(12, 10, 3, generator=generator) * 0.3
                pixels[..., colour] += 0.7
                Image.fromarray((pixels * 255).byte().numpy()).save(folder / f"{i}.png")
    out = tmp_path / "run"
    flags = ["--model", "vgg16_resizer_cbam", "--data", str(root), "--dataset", "folder",
             *TINY, "--batch-size", "4", "--out", str(out), "--quiet"]
    assert train.main([*flags, "--epochs", "1"]) == 0
    assert train.main([*flags, "--epochs", "2", "--resume"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert (metrics["classes"], metrics["train_samples"], metrics["test_samples"]) == (
        ["green", "red"], 12, 4)
