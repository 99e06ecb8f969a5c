"""The learning-rate schedule: a per-epoch cosine to 0, and what a resume with another ``--epochs``
does to it.

A run of ``E`` epochs trains epoch ``e`` (counted from 0) at

    ``lr_e = peak * (1 + cos(pi * e / E)) / 2``,

SGDR's cosine (Loshchilov & Hutter, ICLR 2017, eq. 5) with ``eta_min = 0`` and no restart: the
first epoch uses the peak ``--lr``, the last one a small positive rate, and the curve would reach
0 one epoch after the end.

Resuming after ``k`` finished epochs with the same ``--epochs`` continues that curve. Resuming with
another ``--epochs E'`` (larger or smaller, ``k < E'``) keeps the ``k`` epochs as they were
trained and draws a new cosine over the remaining ones, from the rate the last finished epoch
used, ``r = lr_(k-1)``, down to 0:

    ``lr_e = r * (1 + cos(pi * (e - k) / (E' - k))) / 2`` for ``k <= e < E'``.

So the rate never jumps up and never rises: epoch ``k`` repeats epoch ``k - 1``'s rate, then it
falls. Extending a finished run therefore goes on at the small rate its last epoch used; to train
again from the peak, start a new run (another ``--out``). Asking for ``E' <= k`` trains nothing.
Every resume with another ``--epochs`` adds one piece, so a run resumed twice has three; the
pieces are saved in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["CosineSchedule", "Piece"]


@dataclass(frozen=True)
class Piece:
    """A cosine from ``scale`` times the peak rate at epoch ``start`` to 0 at epoch ``end``."""

    start: int
    end: int
    scale: float


@dataclass(frozen=True)
class CosineSchedule:
    """Per-epoch multipliers of the peak learning rate, as cosine pieces in epoch order.

    Example:
        >>> s = CosineSchedule.over(4)
        >>> [round(s.scale(e), 3) for e in range(4)]
        [1.0, 0.854, 0.5, 0.146]
        >>> [round(s.resumed(2, 4 + 2).scale(e), 3) for e in range(6)]
        [1.0, 0.854, 0.854, 0.729, 0.427, 0.125]
    """

    pieces: tuple[Piece, ...]

    @classmethod
    def over(cls, epochs: int) -> CosineSchedule:
        """One cosine from the peak rate over ``epochs`` epochs: a fresh run's schedule."""
        if epochs < 1:
            raise ValueError(f"a schedule needs at least 1 epoch, got {epochs}")
        return cls((Piece(0, epochs, 1.0),))

    @property
    def epochs(self) -> int:
        """The epoch count the schedule ends at."""
        return self.pieces[-1].end

    def scale(self, epoch: int) -> float:
        """The multiplier of the peak rate in ``epoch`` (counted from 0)."""
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must lie in [0, {self.epochs}), got {epoch}")
        piece = next(p for p in reversed(self.pieces) if p.start <= epoch)
        return piece.scale * (1 + math.cos(math.pi * (epoch - piece.start)
                                           / (piece.end - piece.start))) / 2

    def resumed(self, done: int, epochs: int) -> CosineSchedule:
        """The schedule of a run resumed after ``done`` finished epochs with ``--epochs epochs``.

        Unchanged when ``epochs`` is the schedule's own count or no epoch is left to train; else
        the epochs before ``done`` keep their rates and a new piece starts at ``done`` from the
        rate of epoch ``done - 1`` (see the module docstring).
        """
        if epochs == self.epochs or done >= epochs:
            return self
        if done == 0:
            return CosineSchedule.over(epochs)
        kept = tuple(p for p in self.pieces if p.start < done)
        return CosineSchedule((*kept, Piece(done, epochs, self.scale(done - 1))))

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set every parameter group's rate for ``epoch``; return the first group's.

        The peak is each group's ``initial_lr`` (set from ``lr`` the first time, as PyTorch's
        schedulers do, and saved with the optimiser's state).
        """
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * self.scale(epoch)
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> list[list[int | float]]:
        """Plain lists, so a ``weights_only`` checkpoint can hold it."""
        return [[p.start, p.end, p.scale] for p in self.pieces]

    @classmethod
    def from_state_dict(cls, state: Sequence[Sequence[int | float]]) -> CosineSchedule:
        """Rebuild what :meth:`state_dict` returned."""
        pieces = tuple(Piece(int(start), int(end), float(scale)) for start, end, scale in state)
        if not pieces:
            raise ValueError("a schedule needs at least one piece, got none")
        return cls(pieces)
