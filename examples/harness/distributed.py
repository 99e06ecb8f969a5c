"""``torchrun`` support: DistributedDataParallel set-up from the ``env://`` variables.

Run a script as ``torchrun --nproc_per_node=N -m examples.dfpn_classifier.train ...``; torchrun
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and :func:`setup` joins the
process group (NCCL on CUDA, gloo on CPU). Without torchrun it is one process and nothing is
initialised.

Any model trains under DDP, also one with trainable parameters that no loss depends on (the study's
FPN keeps the smoothing convs of the levels coarser than the P2 it pools; Table 1 counts them).
Before wrapping, :func:`params_without_grad` runs one traceless forward and backward pass on two
training images per rank; :func:`wrap_ddp` turns on DDP's search for unused parameters only when
some rank found one, so a model whose parameters all get gradients is wrapped as plainly (and
runs as fast) as before. One probe cannot foresee a model that skips parameters only on some
steps (random layer drop); DDP then stops at the first such step with its "Expected to have
finished reduction" error, which lists them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from examples.harness.checkpoint import get_rng_state, set_rng_state

__all__ = [
    "Dist",
    "broadcast_object",
    "cleanup",
    "params_without_grad",
    "reduce_sums",
    "resolve_device",
    "setup",
    "unused_on_any_rank",
    "wrap_ddp",
]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that prints summaries and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when available, else CPU; a bare ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device: str) -> Dist:
    """Join the torchrun process group if WORLD_SIZE > 1; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank, resolved)


def cleanup(info: Dist) -> None:
    """Leave the process group (a no-op for a single process)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def reduce_sums(values: Tensor, info: Dist) -> list[float]:
    """Sum ``values`` (a 1-d tensor) element-wise over all ranks, in float64 on the backend's
    device; one host sync."""
    if not info.enabled:
        return values.tolist()
    total = values.to(info.device, torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.tolist()


def broadcast_object(obj: object, info: Dist) -> object:
    """Rank 0's ``obj`` on every rank (pickled; only for objects this harness made itself)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=info.device if info.device.type == "cuda"
                               else None)
    return box[0]


def params_without_grad(model: nn.Module, loss_of: Callable[[nn.Module], Tensor]) -> list[str]:
    """Names of the trainable parameters that one backward pass of ``loss_of(model)``, in train
    mode, leaves without a gradient.

    The probe leaves no trace: every module's train/eval flag, every buffer (BatchNorm running
    statistics and batch counters), every gradient and every RNG the loop uses
    (:func:`~examples.harness.checkpoint.get_rng_state`) are put back as they were, so a run
    trains bit for bit as it would without the probe and a resumed run as an uninterrupted one.
    """
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = [p.grad for _, p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    rng = get_rng_state()
    try:
        for _, p in params:
            p.grad = None
        model.train()
        loss_of(model).backward()
        return [name for name, p in params if p.grad is None]
    finally:
        set_rng_state(rng)
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for (_, p), grad in zip(params, grads):
            p.grad = grad


def unused_on_any_rank(model: nn.Module, unused: Sequence[str], info: Dist) -> list[str]:
    """The trainable parameters of ``model`` that some rank's probe left without a gradient;
    ``unused`` is this rank's. Every rank gets the same list, so every rank wraps alike."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    flags = torch.tensor([float(name in unused) for name in names], dtype=torch.float64)
    return [name for name, hits in zip(names, reduce_sums(flags, info)) if hits > 0]


def wrap_ddp(net: nn.Module, unused: Sequence[str]) -> DistributedDataParallel:
    """``net`` in DDP; ``unused`` (the same on every rank) names the parameters without gradient.

    With none, DDP is built exactly as before: no graph walk, full speed. With some,
    ``find_unused_parameters=True`` walks the autograd graph after every forward pass and marks
    what it did not reach as ready. ``static_graph=True`` would walk only once, but it requires
    the same parameters to be used in every step and stops with "Your training graph has changed"
    otherwise (a model with data-dependent branches, or one the probe saw on a lucky batch);
    the walk handles any model, and on the study's networks it costs less than we can measure
    next to a step (under 1 ms on CPU, where a 16x16 step takes 30-90 ms).
    """
    if unused:
        return DistributedDataParallel(net, find_unused_parameters=True)
    return DistributedDataParallel(net)
