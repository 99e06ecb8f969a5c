"""The learning-rate schedule of the training harness: the logged rate is the rate an epoch used,
and a resume with another ``--epochs`` continues from the last rate on a new cosine to 0.

Expected rates come from the cosine written out here, not from the harness's own code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from examples.dfpn_classifier.models import MODELS
from examples.harness import TrainConfig, fit
from examples.harness import loop as harness_loop
from examples.harness.schedule import CosineSchedule

PEAK = 2e-3



# Small models on a shared 2-core machine run faster on one thread than on two.
pytestmark = pytest.mark.usefixtures("one_thread")

def _cosine(top: float, epoch: int, start: int, end: int) -> float:
    return top * (1 + math.cos(math.pi * (epoch - start) / (end - start))) / 2


def _expected(first: int, done: int, resumed: int) -> list[float]:
    """Rates of the epochs of a run planned for ``first`` epochs, stopped after ``done`` and
    resumed with ``--epochs resumed`` (which trains nothing if ``resumed <= done``)."""
    if resumed == first or resumed <= done:
        return [_cosine(PEAK, e, 0, first) for e in range(max(done, resumed))]
    last = _cosine(PEAK, done - 1, 0, first)
    return ([_cosine(PEAK, e, 0, first) for e in range(done)]
            + [_cosine(last, e, done, resumed) for e in range(done, resumed)])


def test_fresh_schedule_is_the_cosine_over_the_run():
    for epochs in (1, 3, 7):
        s = CosineSchedule.over(epochs)
        assert [s.scale(e) for e in range(epochs)] == pytest.approx(
            [_cosine(1.0, e, 0, epochs) for e in range(epochs)], rel=1e-12)
    with pytest.raises(ValueError, match=r"epoch must lie in \[0, 3\), got 3"):
        CosineSchedule.over(3).scale(3)


@pytest.mark.parametrize(("first", "done", "resumed"),
                         [(3, 3, 6), (3, 1, 6), (6, 4, 5), (5, 2, 5), (4, 4, 4), (5, 3, 2)])
def test_resumed_schedule_matches_the_formula_and_never_rises(first, done, resumed):
    s = CosineSchedule.over(first).resumed(done, resumed)
    rates = [PEAK * s.scale(e) for e in range(max(done, resumed))]
    assert rates == pytest.approx(_expected(first, done, resumed), rel=1e-12)
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert CosineSchedule.from_state_dict(s.state_dict()) == s


def test_two_resumes_make_three_pieces_and_a_dead_piece_is_dropped():
    s = CosineSchedule.over(4).resumed(2, 6)
    killed = s.resumed(4, 9)  # resumed at 4 with 9 epochs, then killed before epoch 5 ended
    again = killed.resumed(4, 8)
    assert len(again.pieces) == 3 and again.pieces[:2] == s.pieces
    assert again.scale(4) == pytest.approx(s.scale(3), rel=1e-12)
    assert again.scale(7) == pytest.approx(s.scale(3) * _cosine(1.0, 3, 0, 4), rel=1e-12)


def _config(out: Path, epochs: int, **kwargs: object) -> TrainConfig:
    return TrainConfig(model="resnet50", out=out, dataset="digits", image_size=16, limit=32,
                       batch_size=16, epochs=epochs, lr=PEAK, quiet=True, **kwargs)


class _Stop(Exception):
    pass


@pytest.fixture
def used_rates(monkeypatch) -> list[float]:
    """The rate the optimiser holds while each epoch trains, in order; ``used_rates.stop_after``
    (if set) interrupts the run after that many epochs, as a kill would."""
    rates = _Rates()
    real = harness_loop.train_one_epoch

    def spy(net, loader, optimizer, *args):
        if rates.stop_after is not None and len(rates) >= rates.stop_after:
            raise _Stop
        rates.append(optimizer.param_groups[0]["lr"])
        return real(net, loader, optimizer, *args)

    monkeypatch.setattr(harness_loop, "train_one_epoch", spy)
    return rates


class _Rates(list):
    stop_after: int | None = None


def _logged(out: Path) -> list[float]:
    return [h["lr"] for h in json.loads((out / "metrics.json").read_text())["history"]]


def test_logged_rate_is_the_rate_each_epoch_trained_at(tmp_path, used_rates):
    fit(_config(tmp_path, 3, checkpoint=False), MODELS["resnet50"])
    assert _logged(tmp_path) == used_rates
    assert used_rates == pytest.approx(_expected(3, 3, 3), rel=1e-12)
    assert used_rates[-1] > 0


@pytest.mark.parametrize(("first", "done", "resumed"), [(2, 2, 4), (4, 2, 6), (4, 2, 3),
                                                        (4, 2, 4)])
def test_resume_with_other_epochs_follows_the_documented_schedule(tmp_path, used_rates, first,
                                                                  done, resumed):
    used_rates.stop_after = done if done < first else None
    try:
        fit(_config(tmp_path, first), MODELS["resnet50"])
    except _Stop:
        pass
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == done
    used_rates.stop_after = None
    fit(_config(tmp_path, resumed, resume=True), MODELS["resnet50"])
    expected = _expected(first, done, resumed)
    assert used_rates == pytest.approx(expected, rel=1e-12)
    assert _logged(tmp_path) == used_rates
    assert all(a >= b for a, b in zip(used_rates, used_rates[1:]))
