"""Time dilconv blocks against what people use now, and against what the hardware allows.

    python -m benchmarks.run                          # every pair, CPU or CUDA (auto)
    python -m benchmarks.run --device cuda --dtype bfloat16 --channels-last --json b.json
    python -m benchmarks.run --quick --cases fusion   # tiny sizes, pairs whose name matches
    python -m benchmarks.run --size train             # FPN, CBAM, fusion, BiFPN at batch 16

Each pair of :data:`benchmarks.cases.CASES` runs forward (eval mode, no gradient) and
forward+backward (train mode; the loss is the sum of the outputs' float32 means, gradients are
set to None before each step, and blocks' inputs need a gradient too). Both sides get the same
inputs, dtype, memory format and (with ``--compile``) ``torch.compile``. Ours and the peer are
timed in alternating blocks (see :mod:`benchmarks.timing`); the ratio is ours / peer, below 1
when ours is faster.

Precision: ``--dtype bfloat16`` or ``float16`` casts the inputs to that dtype and runs every
step under ``torch.autocast`` with float32 parameters (mixed precision, as people train);
float32 runs without autocast.

``--size train`` times the blocks at a training size instead (EfficientDet-D0: batch 16 of
512 x 512 images, see :func:`benchmarks.cases.training_cases`). ``meta`` records the git commit
measured and whether the tree was clean (results under ``benchmarks/results/`` aside).

Next to each ratio (see :mod:`benchmarks.limits`): achieved GFLOP/s, bytes moved and GB/s for
memory-bound blocks, time(block) / time(its convolutions alone), the cost of dilation, the
convolution kernels that ran and whether ``slow_conv_dilated2d`` was among them, and peak CUDA
memory (none on the CPU). ``--deterministic`` turns on
``torch.use_deterministic_algorithms`` (warn only) and cuDNN's deterministic mode, which can
make dilated convolutions on cuDNN much slower: the run reports what it costs, it does not hide
it (on an H200 with torch 2.11 it cost nothing measurable).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.cases import CASES, Case, Inputs, training_cases
from benchmarks.limits import SLOW_KERNEL, ConvReplay, count_flops, kernels, tensor_bytes, tensors
from benchmarks.report import device_name, header, progress, to_markdown, write_json
from benchmarks.timing import Settings, peak_memory_mb, time_interleaved

__all__ = ["MODES", "SIZES", "git_state", "main", "select_cases"]

MODES = ("fwd", "fwd+bwd")
SIZES = ("default", "train")
REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUICK = Settings(rounds=3, block_s=0.002)
NOISY = 0.25
"""An IQR above this fraction of the median marks a case ``noisy`` (a loaded machine, say)."""
BACKWARD = ("loss = sum of the outputs' float32 means, gradients set to None each step; "
            "blocks' inputs need a gradient, images do not")


def select_cases(pattern: str | None, size: str = "default") -> list[Case]:
    """The cases whose ``"name vs peer"`` matches ``pattern`` (a case-insensitive regex), at
    the default sizes or (``size="train"``) those timed at a training size."""
    cases = list(CASES) if size == "default" else training_cases(CASES)
    if not pattern:
        return cases
    regex = re.compile(pattern, re.IGNORECASE)
    return [case for case in cases if regex.search(case.label)]


def git_state(repo: Path = REPO) -> dict[str, str | bool | None]:
    """``{"commit": HEAD's hash, "clean": no tracked file changed}`` of ``repo``; results under
    ``benchmarks/results/`` do not count (a check writes them between runs). Outside a git
    checkout (a copy of the tree on a GPU machine, say) the commit is ``$DILCONV_COMMIT`` if
    set, and cleanliness unknown; both ``None`` without either."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return {"commit": os.environ.get("DILCONV_COMMIT") or None, "clean": None}
    return {"commit": commit, "clean": not changed}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats")
    parser.add_argument("--size", choices=SIZES, default="default",
                        help="train: the blocks at EfficientDet-D0's training size (batch 16, "
                        "512 x 512 images)")
    parser.add_argument("--budget-s", type=float, metavar="S",
                        help=f"seconds of timing per case and mode (default "
                        f"{Settings().budget_s:g}; fewer rounds when short)")
    parser.add_argument("--cases", metavar="PATTERN", help="regex on 'name vs peer'")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads (torch.set_num_threads); torch's default if left out")
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--markdown", type=Path, metavar="PATH")
    return parser.parse_args(argv)


def _device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(choice)


@contextlib.contextmanager
def _global_settings(threads: int | None, device: torch.device, deterministic: bool):
    """Set threads, determinism and cuDNN autotuning for the run; restore them afterwards
    (``main`` may be called inside another program, a test session say)."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        # cuBLAS needs this set before its first call to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[3:]


def _place(inputs: Inputs, device: torch.device, dtype: torch.dtype, channels_last: bool):
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, dtype if t.is_floating_point() else t.dtype)
        if channels_last and t.ndim == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    if isinstance(inputs, dict):
        return type(inputs)((k, one(v)) for k, v in inputs.items())
    if isinstance(inputs, list):
        return [one(t) for t in inputs]
    return one(inputs)


def _with_grad(inputs: Inputs, requires_grad: bool) -> Inputs:
    def one(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(requires_grad)

    if isinstance(inputs, dict):
        return type(inputs)((k, one(v)) for k, v in inputs.items())
    if isinstance(inputs, list):
        return [one(t) for t in inputs]
    return one(inputs)


def _step(module: nn.Module, inputs: Inputs, backward: bool,
          autocast: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], object]:
    """One forward (no grad) or forward+backward call of ``module`` on ``inputs``."""
    params = [p for p in module.parameters() if p.requires_grad]
    leaves = [t for t in tensors(inputs) if t.requires_grad]

    def fresh() -> Inputs:  # a new container each call: effdet's BiFpn appends to its list
        return type(inputs)(inputs) if isinstance(inputs, (list, dict)) else inputs

    def forward() -> object:
        with torch.no_grad(), autocast():
            return module(fresh())

    def forward_backward() -> object:
        for t in (*params, *leaves):
            t.grad = None
        with autocast():
            out = module(fresh())
        sum(t.float().mean() for t in tensors(out)).backward()
        return out

    return forward_backward if backward else forward


def _call_replay(replay: ConvReplay, backward: bool,
                 autocast: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], object]:
    def run() -> object:
        if not backward:
            with torch.no_grad(), autocast():
                return replay()
        for conv in replay.convs:
            for p in conv.parameters():
                p.grad = None
        for x in replay.recorded:
            x.grad = None
        with autocast():
            out = replay()
        sum(t.float().mean() for t in out).backward()
        return out

    return run


def _batch(inputs: Inputs) -> int:
    return tensors(inputs)[0].shape[0]


def _measure(case: Case, mode: str, eager: tuple[nn.Module, nn.Module],
             timed: tuple[nn.Module, nn.Module], inputs: Inputs, args: argparse.Namespace,
             device: torch.device, settings: Settings) -> dict:
    backward = mode == "fwd+bwd"
    dtype = DTYPES[args.dtype]
    autocast = (contextlib.nullcontext if dtype == torch.float32
                else lambda: torch.autocast(device.type, dtype=dtype))
    for module in (*eager, *timed):
        module.train(backward)
    inputs = _with_grad(inputs, backward and case.grad_inputs)
    steps = [_step(m, inputs, backward, autocast) for m in timed]
    replay = None
    if case.conv_ratio:
        replay = ConvReplay(eager[0], _step(eager[0], inputs, False, autocast), backward)
        steps.append(_call_replay(replay, backward, autocast))
    times = time_interleaved(steps, device, settings)
    ours, peer = times[0], times[1]
    row: dict = {
        "name": case.name, "peer": case.peer, "mode": mode, "dtype": args.dtype,
        "device": device.type, "ours_ms": ours.median_ms, "peer_ms": peer.median_ms,
        "ratio": ours.median_ms / peer.median_ms,
        "ours_iqr_ms": ours.iqr_ms, "peer_iqr_ms": peer.iqr_ms, "rounds": ours.rounds,
        "noisy": max(t.iqr_ms / t.median_ms for t in (ours, peer)) > NOISY,
        "ours_images_per_s": _batch(inputs) / ours.median_ms * 1e3,
        "peer_images_per_s": _batch(inputs) / peer.median_ms * 1e3,
        "ours_peak_mib": peak_memory_mb(steps[0], device),
        "peer_peak_mib": peak_memory_mb(steps[1], device),
    }
    eager_steps = [_step(m, inputs, backward, autocast) for m in eager]
    row["ours_flops"], row["peer_flops"] = (count_flops(s) for s in eager_steps)
    # Element-wise work counts no FLOPs: GFLOP/s is left out rather than reported as 0.
    row["ours_gflop_s"] = row["ours_flops"] / ours.median_ms / 1e6 or None
    row["peer_gflop_s"] = row["peer_flops"] / peer.median_ms / 1e6 or None
    if case.memory_bound:
        moved = tensor_bytes([inputs, eager_steps[0]()]) * (2 if backward else 1)
        row["bytes"] = moved
        row["ours_gb_s"] = moved / ours.median_ms / 1e6
        row["peer_gb_s"] = moved / peer.median_ms / 1e6
    if replay is not None:
        row["convs_ms"] = times[2].median_ms
        row["conv_ratio"] = ours.median_ms / times[2].median_ms
    if case.dilation_cost:
        row["dilation_cost"] = row["ratio"]
    if case.dilated:
        row["kernels"] = kernels(steps[0], device)
        row["peer_kernels"] = kernels(steps[1], device)
        row["slow_path"] = any(SLOW_KERNEL in name for name in row["kernels"])
        row["peer_slow_path"] = any(SLOW_KERNEL in name for name in row["peer_kernels"])
    return row


def _missing(case: Case) -> list[str]:
    return [name for name in case.requires if importlib.util.find_spec(name) is None]


def _run_case(case: Case, args: argparse.Namespace, device: torch.device,
              settings: Settings) -> list[dict] | None:
    """Both modes of one case; ``None`` when a package it imports fails to load."""
    torch.manual_seed(0)
    try:
        ours, peer, inputs = case.build(args.quick)
    except ImportError as error:
        print(f"skip {case.label}: {error}", flush=True)
        return None
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    eager = (ours.to(device, memory_format=fmt), peer.to(device, memory_format=fmt))
    timed = tuple(torch.compile(m) for m in eager) if args.compile else eager
    inputs = _place(inputs, device, DTYPES[args.dtype], args.channels_last)
    rows = []
    for mode in MODES:
        row = _measure(case, mode, eager, timed, inputs, args, device, settings)
        print(progress(row), flush=True)
        if row.get("slow_path"):
            print(f"WARNING: {case.name} ran {SLOW_KERNEL} ({mode}, {args.dtype})", flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the selected pairs; print a line per case and write ``--json``/``--markdown``."""
    args = _parse(argv)
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    if args.budget_s is not None and not args.budget_s > 0:
        raise SystemExit(f"--budget-s must be > 0, got {args.budget_s}")
    device = _device(args.device)
    cases = select_cases(args.cases, args.size)
    if not cases:
        print(f"no case matches --cases {args.cases!r} at --size {args.size}", file=sys.stderr)
        return 2
    with _global_settings(args.threads, device, args.deterministic):
        meta, rows = _run(args, device, cases)
    if args.json:
        write_json(args.json, meta, rows)
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(to_markdown(meta, rows))
        print(f"wrote {args.markdown}")
    return 0


def _run(args: argparse.Namespace, device: torch.device,
         cases: list[Case]) -> tuple[dict, list[dict]]:
    settings = QUICK if args.quick else Settings()
    if args.budget_s is not None:
        settings = dataclasses.replace(settings, budget_s=args.budget_s,
                                       block_s=min(settings.block_s, args.budget_s / 10))
    meta = {
        **git_state(),
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "dtype": args.dtype,
        "precision": "float32" if args.dtype == "float32" else
        f"inputs in {args.dtype}, float32 parameters, torch.autocast",
        "channels_last": args.channels_last, "compile": args.compile,
        "deterministic": args.deterministic, "quick": args.quick, "size": args.size,
        "rounds": [settings.min_rounds, settings.rounds],
        "backward": BACKWARD, "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "skipped": [],
    }
    print(header(meta), flush=True)
    rows: list[dict] = []
    for case in cases:
        missing = _missing(case)
        if missing:
            print(f"skip {case.label}: {', '.join(missing)} not installed", flush=True)
        case_rows = None if missing else _run_case(case, args, device, settings)
        if case_rows is None:
            meta["skipped"].append({"case": case.label, "missing": missing or case.requires})
            continue
        rows.extend(case_rows)
    return meta, rows


if __name__ == "__main__":
    raise SystemExit(main())
