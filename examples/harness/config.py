"""Command-line flags of the train scripts and the :class:`TrainConfig` they fill.

Defaults follow the Dilated-FPN study (seed 000): 100 epochs, batch size 32. The default
optimiser is AdamW (lr 1e-3, weight decay 0.01, PyTorch's defaults otherwise), its learning rate
annealed per epoch on a cosine from ``--lr`` to 0 over ``--epochs`` (no warm-up). ``--resume``
with another ``--epochs`` keeps the epochs already trained and continues from the last one's rate
on a new cosine to 0 over the remaining epochs, never jumping up (formulas in
:mod:`~examples.harness.schedule`). Adam's
per-parameter step size matters here: the study's networks start with gradient norms in the
hundreds (no zero-initialised last BN in the residual branches, no normalisation in the FPN
neck), which makes SGD at lr 0.01 diverge on the FPN variants. ``--optimizer sgd`` (Nesterov
momentum ``--momentum``; plain momentum with ``--no-nesterov``) is there for the classic recipe,
and ``--lr-milestones 100 150 --lr-gamma 0.1`` replaces the cosine by steps (``MultiStepLR``).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

__all__ = [
    "DATASETS",
    "OPTIMIZERS",
    "TrainConfig",
    "add_arguments",
    "bounded_float",
    "config_from_args",
    "positive_float",
    "positive_int",
]

DATASETS = ("folder", "cifar10", "digits")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Everything one training run needs; ``vars(args)`` of :func:`add_arguments` fills it."""

    model: str
    out: Path
    data: Path | None = None
    dataset: str = "folder"
    download: bool = False
    val_fraction: float = 0.2
    limit: int | None = None
    image_size: int = 256
    epochs: int = 100
    batch_size: int = 32
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.01
    lr_milestones: Sequence[int] = ()
    """Epochs after which the rate is multiplied by ``lr_gamma``; empty: the cosine."""
    lr_gamma: float = 0.1
    workers: int | None = None
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    resume: bool = False
    quiet: bool = False
    checkpoint: bool = True
    options: dict[str, str | int | float | bool | None] = field(default_factory=dict)
    """The script's own flags (``--neck``, ``--cutmix-p``, ...), as plain values."""

    def to_dict(self) -> dict[str, object]:
        """Plain values only (paths as strings), for ``metrics.json`` and the checkpoint."""
        return {k: _plain(v) for k, v in asdict(self).items()}


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def bounded_float(low: float, high: float, *, include_low: bool = True,
                  include_high: bool = True) -> Callable[[str], float]:
    """argparse type: a float in the interval from ``low`` to ``high`` (ends as given)."""
    def parse(text: str) -> float:
        value = float(text)
        above = value >= low if include_low else value > low
        below = value <= high if include_high else value < high
        if not (above and below):
            opening, closing = "[" if include_low else "(", "]" if include_high else ")"
            interval = f"{opening}{low:g}, {high:g}{closing}"
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {value}")
        return value

    return parse


_fraction = bounded_float(0.0, 1.0, include_low=False, include_high=False)
positive_float = bounded_float(0.0, math.inf, include_low=False, include_high=False)


class _Increasing(argparse.Action):
    """Stores a list of ints that must rise strictly (the milestones)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Sequence[int], option_string: str | None = None) -> None:
        if any(a >= b for a, b in zip(values, values[1:])):
            parser.error(f"{option_string} must rise strictly, got {' '.join(map(str, values))}")
        setattr(namespace, self.dest, list(values))


def add_arguments(parser: argparse.ArgumentParser, models: Iterable[str], *,
                  datasets: Iterable[str] = DATASETS, default_dataset: str = "folder",
                  model_flags: Sequence[str] = ("--model",)) -> None:
    """Add the harness flags to ``parser``; ``models`` are the accepted ``--model`` names and
    ``datasets`` the ``--dataset`` choices; ``model_flags`` spell the model flag (the detector
    takes ``--neck``). A script changes other defaults with ``parser.set_defaults``."""
    models = sorted(models)
    d = TrainConfig(model=models[0], out=Path("runs/train"), dataset=default_dataset)
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="a folder of data, recognised by its layout "
                      "(ImageFolder with train/ and val/ or test/, or one class tree split by "
                      "--val-fraction; COCO folder; mask folder; see examples.harness.layouts), "
                      "or the download root of --dataset")
    data.add_argument("--dataset", choices=("auto", *datasets), default="auto",
                      help=f"auto: what --data holds (without --data: {d.dataset}); folder: "
                      "--data is the script's kind of folder; cifar10: torchvision CIFAR-10 "
                      "under --data; digits: scikit-learn's bundled 8x8 digits (offline); "
                      "coco, voc, digits-canvas: see the script's help")
    data.add_argument("--download", action="store_true", help="let --dataset cifar10 download")
    data.add_argument("--val-fraction", type=_fraction, default=d.val_fraction,
                      help="test share when --data is one class tree (no train/ with val/ or "
                      "test/)")
    data.add_argument("--limit", type=positive_int, help="use at most N train and N test images")
    data.add_argument("--image-size", type=positive_int, default=d.image_size)
    data.add_argument("--workers", type=int, help="DataLoader workers (default: 0 for in-memory "
                      "data, else min(4, CPUs))")
    train = parser.add_argument_group("training")
    train.add_argument(*model_flags, dest="model", choices=models, required=True)
    train.add_argument("--epochs", type=positive_int, default=d.epochs,
                       help="total epochs; the rate falls on a cosine from --lr to 0 over them "
                       "(unless --lr-milestones). With --resume and another count, the finished "
                       "epochs stay and a new cosine runs from the last one's rate to 0 over the "
                       "epochs left")
    train.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="per process")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    train.add_argument("--lr", type=float, default=d.lr, help="peak (initial) learning rate")
    train.add_argument("--momentum", type=float, default=d.momentum, help="SGD only")
    train.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov,
                       help="SGD only: Nesterov momentum (--no-nesterov: plain momentum)")
    train.add_argument("--lr-milestones", type=positive_int, nargs="*", action=_Increasing,
                       default=list(d.lr_milestones), metavar="EPOCH",
                       help="multiply the rate by --lr-gamma after each of these epochs "
                       "(MultiStepLR) instead of the cosine; given without epochs: the cosine")
    train.add_argument("--lr-gamma", type=positive_float, default=d.lr_gamma,
                       help="factor of each --lr-milestones step")
    train.add_argument("--weight-decay", type=float, default=d.weight_decay)
    train.add_argument("--seed", type=int, default=d.seed)
    run = parser.add_argument_group("run")
    run.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda")
    run.add_argument("--amp", action="store_true",
                     help="autocast: float16 + GradScaler on CUDA, bfloat16 on CPU")
    run.add_argument("--channels-last", action="store_true")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--out", type=Path, default=d.out,
                     help="folder for checkpoint.pt, metrics.json, curves.png")
    run.add_argument("--resume", action="store_true",
                     help="continue from OUT/checkpoint.pt (start afresh if there is none)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed flags; flags it has no field for (a script's
    own) go to ``options``."""
    names = {f.name for f in fields(TrainConfig)}
    known = {k: v for k, v in vars(args).items() if k in names}
    options = {k: _plain(v) for k, v in vars(args).items() if k not in names}
    return TrainConfig(**known, options=options)
