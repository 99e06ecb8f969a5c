"""The epoch loop: :func:`fit` trains one model on one data set; :func:`main` is the script entry.

Optimiser: AdamW (or SGD) with a per-epoch cosine schedule (see
:mod:`~examples.harness.config`; what a resume with another ``--epochs`` does is in
:mod:`~examples.harness.schedule`). ``history[i]["lr"]`` is the rate epoch ``i + 1`` trained at.
The train order of epoch ``e`` is the permutation drawn from ``seed + e``
(:class:`~torch.utils.data.DistributedSampler` with ``set_epoch``, also for a single process), so
a resumed run sees exactly the batches an uninterrupted one would have seen.

Under torchrun the model is probed once for parameters that get no gradient before it is wrapped
in DDP (see :mod:`~examples.harness.distributed`). Loss and accuracy are summed on the device and
reach the host once per pass (:class:`~examples.harness.metrics.RunningTotals`); on a terminal the
progress bar shows them every :data:`POSTFIX_EVERY` steps.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate
from tqdm import tqdm

from examples.harness import checkpoint as ckpt
from examples.harness.config import TrainConfig, add_arguments, config_from_args
from examples.harness.data import DataError, build_datasets
from examples.harness.distributed import (
    Dist,
    broadcast_object,
    cleanup,
    params_without_grad,
    setup,
    unused_on_any_rank,
    wrap_ddp,
)
from examples.harness.metrics import RunningTotals, plot_curves, write_metrics
from examples.harness.schedule import CosineSchedule

__all__ = ["POSTFIX_EVERY", "evaluate", "fit", "main", "train_one_epoch"]

# Refreshing the bar's loss and accuracy costs a host sync; every 25 steps it costs nothing.
POSTFIX_EVERY = 25

ModelFactory = Callable[..., nn.Module]


class _Shard(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, unpadded, so each test image counts once."""

    def __init__(self, length: int, info: Dist) -> None:
        self.indices = range(info.rank, length, info.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _Step:
    """What a forward pass needs besides the model: device, memory format and autocast."""

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.device = device
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.amp = config.amp

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)


def _forward(net: nn.Module, images: Tensor, labels: Tensor, step: _Step
             ) -> tuple[Tensor, Tensor]:
    """(float32 logits, mean cross-entropy) of a batch already on the device."""
    with step.autocast():
        logits = net(images).float()
        return logits, F.cross_entropy(logits, labels)


def train_one_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, step: _Step, bar: tqdm) -> RunningTotals:
    """One pass over ``loader`` in train mode; returns this rank's running sums (on the device;
    no host sync per step, and one every :data:`POSTFIX_EVERY` steps while ``bar`` shows)."""
    net.train()
    totals = RunningTotals(step.device)
    for images, labels in loader:
        images, labels = step.batch(images, labels)
        logits, loss = _forward(net, images, labels, step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        totals.update(loss, (logits.argmax(1) == labels).sum(), labels.numel())
        bar.update()
        if not bar.disable and (bar.n % POSTFIX_EVERY == 0 or bar.n == bar.total):
            sums = totals.local()
            bar.set_postfix(loss=f"{sums.loss:.3f}", acc=f"{sums.accuracy:.1%}", refresh=False)
    return totals


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, step: _Step) -> RunningTotals:
    """One pass over ``loader`` in eval mode; returns this rank's running sums (on the device)."""
    net.eval()
    totals = RunningTotals(step.device)
    for images, labels in loader:
        images, labels = step.batch(images, labels)
        logits, loss = _forward(net, images, labels, step)
        totals.update(loss, (logits.argmax(1) == labels).sum(), labels.numel())
    return totals


def _loaders(train: Dataset, test: Dataset, config: TrainConfig, info: Dist
             ) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    workers = config.workers
    if workers is None:
        workers = 0 if config.dataset == "digits" else min(4, torch.multiprocessing.cpu_count())
    sampler = DistributedSampler(train, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=config.seed)
    common = {"batch_size": config.batch_size, "num_workers": workers,
              "pin_memory": info.device.type == "cuda", "persistent_workers": workers > 0}
    return (DataLoader(train, sampler=sampler, **common), sampler,
            DataLoader(test, sampler=_Shard(len(test), info), **common))


def _resume_state(config: TrainConfig, num_classes: int) -> dict | str | None:
    """Rank 0's decision: the checkpoint to continue, None to start afresh, or an error text."""
    path = config.out / "checkpoint.pt"
    if not config.checkpoint or not path.exists():
        return None
    if not config.resume:
        return (f"{path} exists; pass --resume to continue that run or choose another --out "
                "(it was left untouched)")
    try:
        return ckpt.load_checkpoint(path, model=config.model, num_classes=num_classes)
    except ckpt.CheckpointError as exc:
        return str(exc)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _ddp(net: nn.Module, raw: nn.Module, train: Dataset, sampler: DistributedSampler, epoch: int,
         step: _Step, info: Dist, log_as: str | None) -> nn.Module:
    """``net`` in DDP, told to search for unused parameters only if a probe found some.

    Each rank probes ``raw`` (``net`` uncompiled) with the first two images it will train on in
    ``epoch``; a parameter without gradient on any rank counts. ``log_as`` names the model in the
    one line rank 0 prints (None: print nothing).
    """
    sampler.set_epoch(epoch)
    indices = list(itertools.islice(sampler, 2))

    def loss_of(model: nn.Module) -> Tensor:
        images, labels = step.batch(*default_collate([train[i] for i in indices]))
        return _forward(model, images, labels, step)[1]

    unused = unused_on_any_rank(raw, params_without_grad(raw, loss_of), info)
    if log_as is not None:
        total = sum(p.requires_grad for p in raw.parameters())
        shown = ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else "")
        tqdm.write(f"{log_as}: {len(unused)} of {total} parameter tensors get no gradient"
                   + (f" ({shown}); DDP searches for unused ones every step" if unused else ""))
    return wrap_ddp(net, unused)


def fit(config: TrainConfig, build_model: ModelFactory, info: Dist | None = None) -> dict:
    """Train ``build_model(num_classes=...)`` as ``config`` says; return the metrics dict.

    Rank 0 writes ``checkpoint.pt`` (unless ``config.checkpoint`` is false), ``metrics.json``
    and ``curves.png`` into ``config.out`` after every epoch.

    Raises:
        DataError: the data set is missing, empty or unreadable.
        CheckpointError: ``config.out`` holds a checkpoint this run may not continue.
    """
    info = info or setup(config.device)
    _seed_everything(config.seed)
    train, test, classes = build_datasets(config)
    if info.is_main:
        config.out.mkdir(parents=True, exist_ok=True)
    state = _resume_state(config, len(classes)) if info.is_main else None
    state = broadcast_object(state, info)
    if isinstance(state, str):
        raise ckpt.CheckpointError(state)
    raw = build_model(num_classes=len(classes)).to(info.device)
    if config.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    optimizer = _optimizer(raw, config)
    schedule = CosineSchedule.over(config.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and info.device.type == "cuda")
    history: list[dict] = []
    show = info.is_main and not config.quiet
    if state is not None:
        try:
            raw.load_state_dict(state["model_state"])
            optimizer.load_state_dict(state["optimizer_state"])
            saved = CosineSchedule.from_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler_state"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{config.out / 'checkpoint.pt'} does not fit this model "
                                       f"({exc}); it was left untouched") from exc
        ckpt.set_rng_state(state["rng"])
        history = list(state["history"])
        schedule = saved.resumed(len(history), config.epochs)
        if show and schedule != saved:
            tqdm.write(f"--epochs {config.epochs}, not {saved.epochs}: the learning rate falls "
                       f"on a new cosine from epoch {len(history)}'s {history[-1]['lr']:.3g} to 0 "
                       f"at epoch {config.epochs}")
    net = torch.compile(raw) if config.compile else raw
    train_loader, sampler, test_loader = _loaders(train, test, config, info)
    step = _Step(config, info.device)
    train_net = net
    if info.enabled:
        train_net = _ddp(net, raw, train, sampler, len(history), step, info,
                         config.model if show else None)
    summary = {"model": config.model, "num_classes": len(classes), "classes": classes,
               "train_samples": len(train), "test_samples": len(test),
               "world_size": info.world_size, "device": str(info.device),
               "parameters": sum(p.numel() for p in raw.parameters()), "config": config.to_dict()}
    if show and history:
        tqdm.write(f"resuming {config.model} after epoch {len(history)} of {config.epochs}")
    for epoch in range(len(history), config.epochs):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        lr = schedule.apply(optimizer, epoch)
        with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not (show and sys.stderr.isatty()), leave=False) as bar:
            seen = train_one_epoch(train_net, train_loader, optimizer, scaler, step, bar)
        seen, scored = seen.reduced(info), evaluate(net, test_loader, step).reduced(info)
        history.append({"epoch": epoch + 1, "lr": lr,
                        "train_loss": seen.loss, "train_acc": seen.accuracy,
                        "test_loss": scored.loss, "test_acc": scored.accuracy,
                        "train_images": int(seen.count), "test_images": int(scored.count),
                        "seconds": time.perf_counter() - start})
        if info.is_main:
            _save(config, raw, optimizer, schedule, scaler, history, len(classes))
            write_metrics(config.out / "metrics.json", summary, history)
        if show:
            h = history[-1]
            tqdm.write(f"{config.model} epoch {h['epoch']}/{config.epochs}: train loss "
                       f"{h['train_loss']:.4f} acc {h['train_acc']:.1%} | test loss "
                       f"{h['test_loss']:.4f} acc {h['test_acc']:.1%} | {h['seconds']:.1f} s")
    if info.is_main:
        write_metrics(config.out / "metrics.json", summary, history)
        plot_curves(config.out / "curves.png", history,
                    f"{config.model} on {config.dataset} ({len(history)} epochs)")
    return {**summary, "history": history, "final": history[-1]}


def _save(config: TrainConfig, raw: nn.Module, optimizer: torch.optim.Optimizer,
          schedule: CosineSchedule, scaler: torch.amp.GradScaler, history: list[dict],
          num_classes: int) -> None:
    if not config.checkpoint:
        return
    ckpt.save_checkpoint(config.out / "checkpoint.pt", {
        "model": config.model, "num_classes": num_classes, "epoch": len(history),
        "model_state": raw.state_dict(), "optimizer_state": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "scaler_state": scaler.state_dict(),
        "rng": ckpt.get_rng_state(), "history": history, "config": config.to_dict()})


def main(argv: list[str] | None, models: Mapping[str, ModelFactory], description: str) -> int:
    """Parse flags, train under torchrun or alone, and turn data/checkpoint errors into a
    one-line message and exit status 2."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, models)
    config = config_from_args(parser.parse_args(argv))
    info = setup(config.device)
    try:
        fit(config, models[config.model], info)
    except (DataError, ckpt.CheckpointError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup(info)
    return 0
