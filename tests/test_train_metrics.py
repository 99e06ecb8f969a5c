"""Step metrics of the training harness: summed on the device, the same figures as by hand.

A host sync cannot be seen on the CPU, so the tests count what causes one on a GPU: reading a
tensor's value into Python (``item``, ``tolist``, ``int``, ``float``, ``bool``, ``index``).
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from examples.dfpn_classifier.models import MODELS
from examples.harness import TrainConfig, build_datasets, fit
from examples.harness import loop as harness_loop
from examples.harness.loop import _Step, evaluate, train_one_epoch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")



# Small models on a shared 2-core machine run faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")

@contextmanager
def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    reads: list[str] = []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name):
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    yield reads
    monkeypatch.undo()


def _toy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3))


def _loader(batches: int, batch_size: int = 4) -> list[tuple[Tensor, Tensor]]:
    """Collated batches, as a DataLoader yields them (whose own start-up reads a CPU seed)."""
    n = batches * batch_size - 1  # a short last batch: sums must weight by batch size
    data = TensorDataset(torch.rand(n, 3, 8, 8), torch.randint(0, 3, (n,)))
    return list(DataLoader(data, batch_size=batch_size))


def _step() -> _Step:
    return _Step(TrainConfig(model="toy", out=Path("unused")), torch.device("cpu"))


def _bar(steps: int, shown: bool) -> tqdm:
    return tqdm(total=steps, disable=not shown, file=io.StringIO())


def test_a_pass_reads_nothing_from_the_device_until_it_ends(monkeypatch):
    model, loader = _toy(), _loader(batches=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with _counting_reads(monkeypatch) as reads, _bar(len(loader), shown=False) as bar:
        seen = train_one_epoch(model, loader, optimizer, scaler, _step(), bar)
        evaluate(model, loader, _step())
    assert reads == []
    with _counting_reads(monkeypatch) as reads:
        seen.local()
    assert reads == ["tolist"]


@pytest.mark.parametrize("every", [2, 3])
def test_progress_bar_reads_the_sums_every_few_steps(monkeypatch, every):
    model, loader = _toy(), _loader(batches=7)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    monkeypatch.setattr(harness_loop, "POSTFIX_EVERY", every)
    steps = len(loader)
    with _counting_reads(monkeypatch) as reads, _bar(steps, shown=True) as bar:
        train_one_epoch(model, loader, optimizer, scaler, _step(), bar)
        postfix = bar.postfix
    shown = [n for n in range(1, steps + 1) if n % every == 0 or n == steps]
    assert reads == ["tolist"] * len(shown)
    assert "loss=" in postfix and "acc=" in postfix


def test_sums_equal_a_direct_computation_over_the_same_batches():
    torch.manual_seed(1)
    model, loader = _toy(), _loader(batches=4)
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with _bar(len(loader), shown=False) as bar:
        seen = train_one_epoch(model, loader, optimizer, scaler, _step(), bar).local()
    scored = evaluate(model, loader, _step()).totals.local()

    loss_sum, correct, count = 0.0, 0, 0
    twin.train()
    for images, labels in loader:
        logits = twin(images)
        loss = F.cross_entropy(logits, labels)
        twin_optimizer.zero_grad()
        loss.backward()
        twin_optimizer.step()
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        count += len(labels)
    assert (seen.loss_sum, seen.correct, seen.count) == (loss_sum, correct, count)
    assert (seen.loss, seen.accuracy) == (loss_sum / count, correct / count)

    loss_sum, correct = 0.0, 0
    twin.eval()
    with torch.no_grad():
        for images, labels in loader:
            logits = twin(images)
            loss_sum += F.cross_entropy(logits, labels).item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
    assert (scored.loss_sum, scored.correct, scored.count) == (loss_sum, correct, count)


def test_logged_test_figures_equal_a_direct_evaluation_of_the_saved_weights(tmp_path):
    config = TrainConfig(model="resnet50", out=tmp_path, dataset="digits", image_size=16,
                         limit=32, batch_size=8, epochs=1, quiet=True)
    fit(config, MODELS[config.model])
    logged = json.loads((tmp_path / "metrics.json").read_text())["history"][-1]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    _, test, classes = build_datasets(config)
    model = MODELS[config.model](num_classes=len(classes)).eval()
    model.load_state_dict(state["model_state"])
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for images, labels in DataLoader(test, batch_size=config.batch_size):
            logits = model(images)
            loss_sum += F.cross_entropy(logits, labels).item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
    assert logged["test_images"] == len(test)
    assert (logged["test_loss"], logged["test_acc"]) == (loss_sum / len(test),
                                                         correct / len(test))
