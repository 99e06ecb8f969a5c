"""``torchrun`` support: DistributedDataParallel set-up from the ``env://`` variables.

Run a script as ``torchrun --nproc_per_node=N -m examples.dfpn_classifier.train ...``; torchrun
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and :func:`setup` joins the
process group (NCCL on CUDA, gloo on CPU). Without torchrun it is one process and nothing is
initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "broadcast_object", "cleanup", "reduce_sums", "resolve_device", "setup"]


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


def reduce_sums(values: list[float], info: Dist) -> list[float]:
    """Sum ``values`` element-wise over all ranks (float64, on the backend's device)."""
    if not info.enabled:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=info.device)
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
