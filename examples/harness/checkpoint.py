"""Checkpoints are user data: written atomically, loaded with ``weights_only=True``, never
overwritten by a run that cannot continue them.

A checkpoint is a dict of tensors and plain containers (str, int, float, list, dict), so
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects: model,
optimiser and grad-scaler state, the learning-rate schedule's pieces
(:class:`~examples.harness.schedule.CosineSchedule`), the number of finished epochs, the per-epoch
history, the run's flags, and the torch / CUDA / NumPy / Python RNG states as tensors. Format 2
replaced format 1's ``scheduler_state`` (a ``CosineAnnealingLR``) with ``schedule``.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "CheckpointError",
    "atomic_write",
    "get_rng_state",
    "load_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "dilconv-examples-checkpoint/2"


class CheckpointError(Exception):
    """A checkpoint that cannot be continued: corrupt, truncated or from another run."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` so that a crash at any point leaves either the old or the new file.

    ``write`` fills a temporary file in the same folder, which is flushed, fsynced and renamed
    over ``path`` with :func:`os.replace`; the folder is then fsynced so the rename survives a
    power cut. On failure the temporary file is removed and ``path`` is left as it was.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX only; Windows cannot open a folder for fsync
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def get_rng_state() -> dict[str, Tensor | list[Tensor]]:
    """Every RNG the loop may touch, as tensors (``weights_only`` cannot load a numpy array)."""
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.tensor([*np_keys.tolist(), np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }


def set_rng_state(state: dict[str, Tensor | list[Tensor]]) -> None:
    """Restore what :func:`get_rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, *mt = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((version, tuple(mt), gauss[0] if gauss else None))
    *keys, pos, has_gauss = state["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss,
                         state["numpy_gauss"].item()))


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically write ``state`` (see :func:`atomic_write`) tagged with :data:`FORMAT`."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: Path, *, model: str, num_classes: int) -> dict:
    """Load and vet a checkpoint written by :func:`save_checkpoint` for this run.

    Raises:
        CheckpointError: unreadable or truncated, not one of ours, or written for another model
            or class count. The message names the file, which is never touched.
    """
    keep = f"{path} was left untouched; move it away or choose another --out"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip or pickle
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt or truncated: "
                              f"{type(exc).__name__}: {exc}); {keep}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of these train scripts "
                              f"(expected format {FORMAT!r}); {keep}")
    if state["model"] != model or state["num_classes"] != num_classes:
        raise CheckpointError(f"{path} belongs to another run: model {state['model']!r} with "
                              f"{state['num_classes']} classes, but this run trains {model!r} "
                              f"with {num_classes} classes; {keep}")
    return state
