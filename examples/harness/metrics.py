"""Per-epoch figures: running sums that reduce exactly over ranks, ``metrics.json``, curves.

Loss and accuracy are kept as sums (``loss * count``, ``correct``, ``count``) so that summing
them over ranks with one ``all_reduce`` and dividing gives the same mean as one process would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from examples.harness.checkpoint import atomic_write
from examples.harness.distributed import Dist, reduce_sums

__all__ = ["Totals", "plot_curves", "write_metrics"]


@dataclass
class Totals:
    """Running sums of one pass over a data set."""

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def update(self, mean_loss: float, correct: int, count: int) -> None:
        self.loss_sum += mean_loss * count
        self.correct += correct
        self.count += count

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1.0)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1.0)

    def reduced(self, info: Dist) -> Totals:
        """The sums over every rank (this rank's own when not distributed)."""
        return Totals(*reduce_sums([self.loss_sum, self.correct, self.count], info))


def write_metrics(path: Path, summary: dict, history: list[dict]) -> None:
    """Atomically write ``metrics.json``: ``summary`` keys, ``history`` and ``final``.

    ``final`` repeats the last epoch's figures and adds the best test accuracy and the total
    training seconds, so a reader needs no arithmetic.
    """
    final = {}
    if history:
        last = history[-1]
        final = {**last, "best_test_acc": max(h["test_acc"] for h in history),
                 "seconds": sum(h["seconds"] for h in history)}
    text = json.dumps({**summary, "history": history, "final": final}, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def plot_curves(path: Path, history: list[dict], title: str) -> None:
    """Save loss (train and test) and test accuracy against epoch as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (mean per image)", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 100))
    ax_acc.legend()
    fig.suptitle(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
