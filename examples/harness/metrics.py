"""Per-epoch figures: running sums that reduce exactly over ranks, ``metrics.json``, curves.

Loss and accuracy are kept as sums (``loss * count``, ``correct``, ``count``) so that summing
them over ranks with one ``all_reduce`` and dividing gives the same mean as one process would.
During an epoch the sums stay on the device (:class:`RunningTotals`), so a training step never
waits for the GPU; they reach the host once, at the end of the pass.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from examples.harness.checkpoint import atomic_write
from examples.harness.distributed import Dist, reduce_sums

__all__ = ["RunningTotals", "Totals", "plot_curves", "write_metrics"]


@dataclass(frozen=True)
class Totals:
    """The sums of one pass over a data set, on the host.

    ``loss_weight`` is what the mean loss is over: the images (``count``) for classification
    and detection, the scored pixels for segmentation.
    """

    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    loss_weight: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.loss_weight if self.loss_weight > 0 else 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1.0)


class RunningTotals:
    """Running sums of one pass, kept on ``device`` until the pass is over.

    :meth:`update` only queues device work; :meth:`local` and :meth:`reduced` are the only host
    syncs. Loss sums are float64, like the Python floats they replace, so the means are the same
    to the last bit as summing ``loss.item() * count`` on the host.

    Args:
        device: where the model's outputs live.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_weight = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0  # a batch's size is known on the host: no need to ask the device

    def update(self, mean_loss: Tensor, correct: Tensor, count: int,
               weight: Tensor | int | None = None) -> None:
        """Add a batch: its mean loss and number of right answers (0-d tensors), its size, and
        what its mean loss is over (``weight``: its size when None, a 0-d tensor of scored
        pixels for segmentation; a batch of weight 0 adds nothing to the mean loss)."""
        weight = count if weight is None else weight
        self.loss_sum += mean_loss.detach().double() * weight
        self.loss_weight += weight
        self.correct += correct.detach()
        self.count += count

    def _sums(self) -> Tensor:
        count = self.loss_sum.new_full((), float(self.count))  # a fill on the device, no copy
        return torch.stack([self.loss_sum, self.correct.double(), count, self.loss_weight])

    def local(self) -> Totals:
        """This rank's sums so far (one host sync)."""
        return Totals(*self._sums().tolist())

    def reduced(self, info: Dist) -> Totals:
        """The sums over every rank (this rank's own when not distributed; one host sync)."""
        return Totals(*reduce_sums(self._sums(), info))


def write_metrics(path: Path, summary: dict, history: list[dict],
                  headline: str = "test_acc") -> None:
    """Atomically write ``metrics.json``: ``summary`` keys, ``history`` and ``final``.

    ``final`` repeats the last epoch's figures and adds the best test accuracy and the total
    training seconds, so a reader needs no arithmetic. ``headline`` names the figure whose best
    value is added (``best_test_acc``, ``best_map50``, ``best_miou``), with its epoch.
    """
    final = {}
    if history:
        last = history[-1]
        best = max(history, key=lambda h: h[headline])
        final = {**last, f"best_{headline}": best[headline], "best_epoch": best["epoch"],
                 "seconds": sum(h["seconds"] for h in history)}
    text = json.dumps({**summary, "history": history, "final": final}, indent=2) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def plot_curves(path: Path, history: list[dict], title: str,
                metrics: Sequence[str] = ("train_acc", "test_acc")) -> None:
    """Save the losses (train, and test where measured) and ``metrics`` (fractions in [0, 1],
    shown in %) against epoch as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if "test_loss" in history[0]:
        ax_loss.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss (mean per image)", title="loss")
    ax_loss.legend()
    for key, marker in zip(metrics, "osd^v", strict=False):
        ax_acc.plot(epochs, [100 * h[key] for h in history], f"{marker}-", label=key)
    ax_acc.set(xlabel="epoch", ylabel="%", title=", ".join(metrics), ylim=(0, 100))
    ax_acc.legend()
    fig.suptitle(title)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
