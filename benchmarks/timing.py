"""Interleaved timing of several callables on one device: median and IQR per call, peak memory.

CPU: ``torch.utils.benchmark.Timer.timeit`` measures each callable for a short block of calls;
blocks of all callables alternate for several rounds (so a change of machine load falls on every
side) and each side's blocks are pooled with ``Measurement.merge`` into a median and IQR.
CUDA: after warm-up, CUDA events bracket each block of calls; blocks alternate as on the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils import benchmark

__all__ = ["Settings", "Timing", "peak_memory_mb", "time_interleaved"]


@dataclass(frozen=True)
class Settings:
    """How long to measure.

    Args:
        rounds: blocks timed per callable, alternating between callables.
        min_rounds: fewest rounds, for callables so slow that ``rounds`` would exceed
            ``budget_s``.
        budget_s: target seconds of all rounds together.
        block_s: target seconds of one block (the calls per block are set from a first timing).
        warmup: calls of each callable before the first timing (which warms up too).
    """

    rounds: int = 7
    min_rounds: int = 3
    budget_s: float = 8.0
    block_s: float = 0.1
    warmup: int = 1


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and interquartile range over ``rounds`` blocks of
    ``calls`` calls."""

    median_ms: float
    iqr_ms: float
    calls: int
    rounds: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_call(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return max(time.perf_counter() - start, 1e-6)


def _block_cpu(fn: Callable[[], object], calls: int, label: str) -> benchmark.Measurement:
    timer = benchmark.Timer(
        stmt="fn()", globals={"fn": fn}, label=label, num_threads=torch.get_num_threads()
    )
    return timer.timeit(calls)


def _block_cuda(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def time_interleaved(
    fns: Sequence[Callable[[], object]], device: torch.device, settings: Settings
) -> list[Timing]:
    """Time each of ``fns`` in alternating blocks; one :class:`Timing` per callable.

    Args:
        fns: callables that each run one step (forward, or forward and backward).
        device: where they run; CUDA is timed with events, anything else with
            ``torch.utils.benchmark`` at ``torch.get_num_threads()`` threads.
        settings: rounds, block length and warm-up.
    """
    for fn in fns:
        for _ in range(settings.warmup):
            fn()
    seconds = [_seconds_per_call(fn, device) for fn in fns]
    calls = [max(1, int(settings.block_s / s)) for s in seconds]
    round_s = sum(n * s for n, s in zip(calls, seconds))
    rounds = max(settings.min_rounds, min(settings.rounds, int(settings.budget_s / round_s)))
    if device.type == "cuda":
        blocks: list[list[float]] = [[] for _ in fns]
        for _ in range(rounds):
            for fn, n, record in zip(fns, calls, blocks):
                record.append(_block_cuda(fn, n, device))
        return [Timing(statistics.median(b), _iqr(b), n, rounds) for b, n in zip(blocks, calls)]
    measured: list[list[benchmark.Measurement]] = [[] for _ in fns]
    for _ in range(rounds):
        for index, (fn, n, record) in enumerate(zip(fns, calls, measured)):
            record.append(_block_cpu(fn, n, label=f"side {index}"))
    timings = []
    for record, n in zip(measured, calls):
        pooled = benchmark.Measurement.merge(record)[0]
        timings.append(Timing(pooled.median * 1e3, pooled.iqr * 1e3, n, rounds))
    return timings


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak CUDA memory of one call above what was allocated before it, in MiB.

    ``None`` off CUDA: the CPU allocator keeps no peak statistic, and the profiler's memory
    records give allocations per operator, not the peak.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
