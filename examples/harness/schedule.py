"""The learning-rate schedules: a per-epoch cosine to 0 (the default) or steps at milestones
(``--lr-milestones``), and what a resume with another ``--epochs`` does to each.

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

With ``--lr-milestones m_1 m_2 ...`` and ``--lr-gamma g`` the rate is instead the peak times ``g``
for every milestone reached, as PyTorch's ``MultiStepLR`` stepped once per epoch gives it:

    ``lr_e = peak * g ** #{i : m_i <= e}``  (``e`` counted from 0),

so ``--lr-milestones 100 150`` trains epochs 1-100 at the peak, 101-150 at ``g`` times it and
the rest at ``g**2`` times it. That rate depends on the epoch alone, so a resume with another
``--epochs`` changes no rate, only where the run ends. A resume must ask for the schedule the run
was started with (the same milestones and gamma, or none for the cosine), else it is refused
(:func:`resumed_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

__all__ = [
    "CosineSchedule",
    "Piece",
    "Schedule",
    "StepSchedule",
    "make_schedule",
    "resumed_schedule",
    "schedule_from_state_dict",
]


@dataclass(frozen=True)
class Piece:
    """A cosine from ``scale`` times the peak rate at epoch ``start`` to 0 at epoch ``end``."""

    start: int
    end: int
    scale: float


class _PerEpoch:
    """What the schedules share: setting the optimiser's rates from :meth:`scale`."""

    def scale(self, epoch: int) -> float:
        raise NotImplementedError

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> float:
        """Set every parameter group's rate for ``epoch``; return the first group's.

        The peak is each group's ``initial_lr`` (set from ``lr`` the first time, as PyTorch's
        schedulers do, and saved with the optimiser's state).
        """
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * self.scale(epoch)
        return optimizer.param_groups[0]["lr"]


@dataclass(frozen=True)
class CosineSchedule(_PerEpoch):
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


@dataclass(frozen=True)
class StepSchedule(_PerEpoch):
    """The peak rate times ``gamma`` for every milestone reached (``MultiStepLR``, per epoch).

    Example:
        >>> s = StepSchedule(milestones=(2, 3), gamma=0.1, epochs=5)
        >>> [round(s.scale(e), 3) for e in range(5)]
        [1.0, 1.0, 0.1, 0.01, 0.01]
    """

    milestones: tuple[int, ...]
    gamma: float
    epochs: int

    def __post_init__(self) -> None:
        ms = self.milestones
        if not ms or ms[0] < 1 or any(a >= b for a, b in zip(ms, ms[1:])):
            raise ValueError(f"milestones must be increasing epochs >= 1, got {list(ms)}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if self.epochs < 1:
            raise ValueError(f"a schedule needs at least 1 epoch, got {self.epochs}")

    def scale(self, epoch: int) -> float:
        """The multiplier of the peak rate in ``epoch`` (counted from 0)."""
        if not 0 <= epoch < self.epochs:
            raise ValueError(f"epoch must lie in [0, {self.epochs}), got {epoch}")
        return self.gamma ** sum(m <= epoch for m in self.milestones)

    def resumed(self, done: int, epochs: int) -> StepSchedule:
        """The same steps, ending at ``epochs`` (unchanged when no epoch is left to train)."""
        return self if done >= epochs else replace(self, epochs=epochs)

    def state_dict(self) -> dict[str, list[int] | float | int]:
        """Plain values, so a ``weights_only`` checkpoint can hold it."""
        return {"milestones": list(self.milestones), "gamma": self.gamma, "epochs": self.epochs}

    @classmethod
    def from_state_dict(cls, state: dict) -> StepSchedule:
        """Rebuild what :meth:`state_dict` returned."""
        return cls(tuple(int(m) for m in state["milestones"]), float(state["gamma"]),
                   int(state["epochs"]))


Schedule = CosineSchedule | StepSchedule


def make_schedule(epochs: int, milestones: Sequence[int] = (), gamma: float = 0.1) -> Schedule:
    """A fresh run's schedule: the cosine over ``epochs`` without ``milestones``, else the steps."""
    if not milestones:
        return CosineSchedule.over(epochs)
    return StepSchedule(tuple(milestones), float(gamma), epochs)


def schedule_from_state_dict(state: Sequence | dict) -> Schedule:
    """Rebuild a checkpoint's schedule: a list of pieces is the cosine, a dict the steps."""
    if isinstance(state, dict):
        return StepSchedule.from_state_dict(state)
    return CosineSchedule.from_state_dict(state)


def _flags(schedule: Schedule) -> str:
    if isinstance(schedule, CosineSchedule):
        return "the cosine schedule (no --lr-milestones)"
    return (f"--lr-milestones {' '.join(map(str, schedule.milestones))} "
            f"--lr-gamma {schedule.gamma:g}")


def resumed_schedule(saved: Schedule, done: int, epochs: int, milestones: Sequence[int] = (),
                     gamma: float = 0.1) -> Schedule:
    """The schedule a run continues with after ``done`` finished epochs under ``saved``.

    ``epochs``, ``milestones`` and ``gamma`` are the resumed run's flags; see the module
    docstring for what another ``epochs`` does.

    Raises:
        ValueError: the flags ask for another kind of schedule than the run was started with,
            or for other milestones or another gamma.
    """
    asked = make_schedule(epochs, milestones, gamma)
    if isinstance(saved, StepSchedule) and isinstance(asked, StepSchedule):
        same = (saved.milestones, saved.gamma) == (asked.milestones, asked.gamma)
    else:
        same = type(saved) is type(asked)
    if not same:
        raise ValueError(f"it was trained with {_flags(saved)}, not {_flags(asked)}; resume it "
                         "with the same schedule flags or start a new run in another --out")
    return saved.resumed(done, epochs)
