"""The epoch loop: :func:`fit` trains one model on one data set; :func:`main` is the script entry.

Optimiser: AdamW (or SGD) with a per-epoch cosine schedule, or steps at ``--lr-milestones`` (see
:mod:`~examples.harness.config`; what a resume with another ``--epochs`` does is in
:mod:`~examples.harness.schedule`). ``history[i]["lr"]`` is the rate epoch ``i + 1`` trained at.
The train order of epoch ``e`` is the permutation drawn from ``seed + e``
(:class:`~torch.utils.data.DistributedSampler` with ``set_epoch``, also for a single process), so
a resumed run sees exactly the batches an uninterrupted one would have seen. The random draws of
the train data (crops, flips, CutMix) are made in the DataLoader's workers, whose seeds cannot be
saved in a checkpoint: the train workers are started afresh every epoch (not persistent), seeded
from a generator set to :func:`worker_seed` ``(seed, epoch, rank)``, so epoch ``e``'s
augmentations are the same in a resumed run as in an uninterrupted one. The test loader (no
random draws) keeps its workers; neither loader draws from the global RNG, which the checkpoint
saves for the model's own draws (dropout). With ``--workers 0`` the draws come from the global
RNG, saved and restored with the checkpoint.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from examples.harness import checkpoint as ckpt
from examples.harness.config import TrainConfig, add_arguments, config_from_args
from examples.harness.data import DataError
from examples.harness.distributed import (
    Dist,
    broadcast_object,
    cleanup,
    params_without_grad,
    setup,
    unused_on_any_rank,
    wrap_ddp,
)
from examples.harness.layouts import resolve_dataset
from examples.harness.metrics import RunningTotals, plot_curves, write_metrics
from examples.harness.schedule import (
    CosineSchedule,
    Schedule,
    make_schedule,
    resumed_schedule,
    schedule_from_state_dict,
)
from examples.harness.tasks import ClassificationTask, Evaluator, Task

__all__ = ["POSTFIX_EVERY", "evaluate", "fit", "main", "train_one_epoch", "worker_seed"]

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
    """What a pass needs besides the model: the task, device, memory format and autocast."""

    def __init__(self, config: TrainConfig, device: torch.device,
                 task: Task | None = None) -> None:
        self.task = task or ClassificationTask()
        self.device = device
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.amp = config.amp

    def batch(self, batch: tuple) -> tuple:
        return self.task.to_device(batch, self.device, self.memory_format)

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)


def train_one_epoch(net: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, step: _Step, bar: tqdm) -> RunningTotals:
    """One pass over ``loader`` in train mode; returns this rank's running sums (on the device;
    no host sync per step, and one every :data:`POSTFIX_EVERY` steps while ``bar`` shows)."""
    net.train()
    totals = RunningTotals(step.device)
    for batch in loader:
        inputs, targets = step.batch(batch)
        loss, correct = step.task.train_loss(net, inputs, targets, step.autocast)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if correct is None:
            correct = torch.zeros((), dtype=torch.int64, device=step.device)
        totals.update(loss, correct, step.task.count(targets), step.task.loss_weight(targets))
        bar.update()
        if not bar.disable and (bar.n % POSTFIX_EVERY == 0 or bar.n == bar.total):
            sums = totals.local()
            shown = {"loss": f"{sums.loss:.3f}"}
            if "train_acc" in step.task.metrics:
                shown["acc"] = f"{sums.accuracy:.1%}"
            bar.set_postfix(shown, refresh=False)
    return totals


@torch.no_grad()
def evaluate(net: nn.Module, loader: DataLoader, step: _Step, num_classes: int = 0
             ) -> Evaluator:
    """One pass over ``loader`` in eval mode; returns the task's evaluator, whose ``compute``
    reduces the figures over ranks."""
    net.eval()
    scores = step.task.evaluator(num_classes, step.device, step.autocast)
    for batch in loader:
        scores.update(net, *step.batch(batch))
    return scores


def _loaders(train: Dataset, test: Dataset, config: TrainConfig, info: Dist, task: Task
             ) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    workers = config.workers
    if workers is None:
        in_memory = config.dataset in ("digits", "digits-canvas")
        workers = 0 if in_memory else min(4, torch.multiprocessing.cpu_count())
    sampler = DistributedSampler(train, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=config.seed)
    common = {"batch_size": config.batch_size, "num_workers": workers,
              "pin_memory": info.device.type == "cuda"}
    # The train loader's generator is re-seeded every epoch (_start_epoch); fresh workers take it.
    return (DataLoader(train, sampler=sampler, collate_fn=partial(task.collate, train=True),
                       generator=torch.Generator(), persistent_workers=False, **common), sampler,
            DataLoader(test, sampler=_Shard(len(test), info),
                       collate_fn=partial(task.collate, train=False),
                       generator=torch.Generator().manual_seed(config.seed),
                       persistent_workers=workers > 0, **common))


def worker_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of epoch ``epoch``'s train DataLoader on ``rank``: a function of the three alone.

    DataLoader itself seeds worker ``w`` of that epoch: torch and Python's ``random`` with a base
    seed drawn from a generator set to this value, plus ``w`` (NumPy from both).
    """
    entropy = (seed % 2**64, epoch, rank)
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def _start_epoch(loader: DataLoader, sampler: DistributedSampler, seed: int, epoch: int,
                 rank: int) -> None:
    """Epoch ``epoch``'s order (the sampler) and worker seeds, whatever ran before it."""
    sampler.set_epoch(epoch)
    loader.generator.manual_seed(worker_seed(seed, epoch, rank))


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
                               nesterov=config.nesterov and config.momentum > 0,
                               weight_decay=config.weight_decay)
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
        inputs, targets = step.batch(step.task.collate([train[i] for i in indices], train=True))
        return step.task.train_loss(model, inputs, targets, step.autocast)[0]

    unused = unused_on_any_rank(raw, params_without_grad(raw, loss_of), info)
    if log_as is not None:
        total = sum(p.requires_grad for p in raw.parameters())
        shown = ", ".join(unused[:4]) + (", ..." if len(unused) > 4 else "")
        tqdm.write(f"{log_as}: {len(unused)} of {total} parameter tensors get no gradient"
                   + (f" ({shown}); DDP searches for unused ones every step" if unused else ""))
    return wrap_ddp(net, unused)


def fit(config: TrainConfig, build_model: ModelFactory, info: Dist | None = None,
        task: Task | None = None) -> dict:
    """Train ``build_model(num_classes=...)`` on ``task`` as ``config`` says; return the metrics.

    ``task`` (default: image classification) says what the data, batches, loss and test
    metrics are (:mod:`~examples.harness.tasks`); ``config.dataset="auto"`` takes the data set
    from what ``config.data`` holds (:func:`~examples.harness.layouts.resolve_dataset`).
    Rank 0 writes ``checkpoint.pt`` (unless ``config.checkpoint`` is false), ``metrics.json``
    and ``curves.png`` into ``config.out`` after every epoch, and ``best.pt`` (the weights of the
    epoch with the best ``task.headline`` so far) whenever that figure improves.

    Raises:
        DataError: the data set is missing, empty or unreadable, or ``config.data`` holds no
            layout the task reads.
        CheckpointError: ``config.out`` holds a checkpoint this run may not continue.
    """
    info = info or setup(config.device)
    task = task or ClassificationTask()
    config = resolve_dataset(config, task.layouts, task.default_dataset)
    _seed_everything(config.seed)
    train, test, classes = task.datasets(config)
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
    schedule = make_schedule(config.epochs, config.lr_milestones, config.lr_gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and info.device.type == "cuda")
    history: list[dict] = []
    show = info.is_main and not config.quiet
    if state is not None:
        try:
            raw.load_state_dict(state["model_state"])
            optimizer.load_state_dict(state["optimizer_state"])
            saved = schedule_from_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler_state"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{config.out / 'checkpoint.pt'} does not fit this model "
                                       f"({exc}); it was left untouched") from exc
        ckpt.set_rng_state(state["rng"])
        history = list(state["history"])
        try:
            schedule = resumed_schedule(saved, len(history), config.epochs,
                                        config.lr_milestones, config.lr_gamma)
        except ValueError as exc:
            raise ckpt.CheckpointError(f"{config.out / 'checkpoint.pt'} cannot be resumed: {exc} "
                                       "(it was left untouched)") from exc
        if show and isinstance(saved, CosineSchedule) and schedule != saved:
            tqdm.write(f"--epochs {config.epochs}, not {saved.epochs}: the learning rate falls "
                       f"on a new cosine from epoch {len(history)}'s {history[-1]['lr']:.3g} to 0 "
                       f"at epoch {config.epochs}")
    net = torch.compile(raw) if config.compile else raw
    train_loader, sampler, test_loader = _loaders(train, test, config, info, task)
    step = _Step(config, info.device, task)
    train_net = net
    if info.enabled:
        train_net = _ddp(net, raw, train, sampler, len(history), step, info,
                         config.model if show else None)
    summary = {"task": task.name, "model": config.model, "num_classes": len(classes),
               "classes": classes,
               "train_samples": len(train), "test_samples": len(test),
               "world_size": info.world_size, "device": str(info.device),
               "parameters": sum(p.numel() for p in raw.parameters()), "config": config.to_dict()}
    if show and history:
        tqdm.write(f"resuming {config.model} after epoch {len(history)} of {config.epochs}")
    for epoch in range(len(history), config.epochs):
        start = time.perf_counter()
        _start_epoch(train_loader, sampler, config.seed, epoch, info.rank)
        lr = schedule.apply(optimizer, epoch)
        with tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{config.epochs}",
                  disable=not (show and sys.stderr.isatty()), leave=False) as bar:
            seen = train_one_epoch(train_net, train_loader, optimizer, scaler, step, bar)
        seen = seen.reduced(info)
        scored = evaluate(net, test_loader, step, len(classes)).compute(info)
        trained = {"train_loss": seen.loss}
        if "train_acc" in task.metrics:
            trained["train_acc"] = seen.accuracy
        history.append({"epoch": epoch + 1, "lr": lr, **trained, **scored,
                        "train_images": int(seen.count),
                        "seconds": time.perf_counter() - start})
        if info.is_main:
            _save(config, raw, optimizer, schedule, scaler, history, len(classes))
            if _is_best(history, task.headline):
                _save_best(config, raw, history, len(classes), task.headline)
            write_metrics(config.out / "metrics.json", summary, history, task.headline)
        if show:
            h = history[-1]
            tqdm.write(f"{config.model} epoch {h['epoch']}/{config.epochs}: "
                       f"{task.describe(h)} | {h['seconds']:.1f} s")
    if info.is_main:
        write_metrics(config.out / "metrics.json", summary, history, task.headline)
        plot_curves(config.out / "curves.png", history,
                    f"{config.model} on {config.dataset} ({len(history)} epochs)",
                    task.metrics)
    return {**summary, "history": history, "final": history[-1]}


def _save(config: TrainConfig, raw: nn.Module, optimizer: torch.optim.Optimizer,
          schedule: Schedule, scaler: torch.amp.GradScaler, history: list[dict],
          num_classes: int) -> None:
    if not config.checkpoint:
        return
    ckpt.save_checkpoint(config.out / "checkpoint.pt", {
        "model": config.model, "num_classes": num_classes, "epoch": len(history),
        "model_state": raw.state_dict(), "optimizer_state": optimizer.state_dict(),
        "schedule": schedule.state_dict(), "scaler_state": scaler.state_dict(),
        "rng": ckpt.get_rng_state(), "history": history, "config": config.to_dict()})


def _is_best(history: list[dict], headline: str) -> bool:
    """Whether the last epoch's ``headline`` beats every earlier one (ties keep the earlier)."""
    last = history[-1][headline]
    return all(last > h[headline] for h in history[:-1])


def _save_best(config: TrainConfig, raw: nn.Module, history: list[dict], num_classes: int,
               headline: str) -> None:
    if not config.checkpoint:
        return
    ckpt.save_checkpoint(config.out / "best.pt", {
        "model": config.model, "num_classes": num_classes, "epoch": len(history),
        "model_state": raw.state_dict(), "history": history, "config": config.to_dict(),
        "best": {headline: history[-1][headline]}})


def main(argv: list[str] | None, models: Mapping[str, ModelFactory], description: str, *,
         task: Task | None = None,
         extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         setup_run: Callable[[argparse.Namespace, TrainConfig],
                             Mapping[str, ModelFactory]] | None = None,
         model_flags: Sequence[str] = ("--model",)) -> int:
    """Parse flags, train under torchrun or alone, and turn data/checkpoint errors into a
    one-line message and exit status 2.

    Args:
        argv: the arguments (``sys.argv[1:]`` when None).
        models: ``--model`` name -> factory called as ``factory(num_classes=...)``.
        description: the script's ``--help`` text.
        task: what is trained (default: image classification).
        extra_arguments: adds the script's own flags to the parser.
        setup_run: ``setup_run(args, config) -> models``: the factories, built from the parsed
            flags (a script whose models take its own flags); raises ``DataError`` or
            ``CheckpointError`` for bad input.
        model_flags: how the model flag is spelled (``("--neck", "--model")``).
    """
    task = task or ClassificationTask()
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, models, datasets=task.datasets_accepted,
                  default_dataset=task.default_dataset, model_flags=model_flags)
    if extra_arguments is not None:
        extra_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    info = setup(config.device)
    try:
        config = resolve_dataset(config, task.layouts, task.default_dataset)
        factories = models if setup_run is None else setup_run(args, config)
        fit(config, factories[config.model], info, task)
    except (DataError, ckpt.CheckpointError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        cleanup(info)
    return 0
