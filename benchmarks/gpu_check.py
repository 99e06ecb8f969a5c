"""Everything that needs a GPU, in one go: ``make gpu-check`` or ``python -m benchmarks.gpu_check``.

Steps, in this order (each with a time limit; the whole check aims at 6 minutes on one GPU):

1. ``environment``: torch built with CUDA and a GPU visible, Triton, timm, effdet, torchvision,
   pytest, hypothesis and scikit-learn importable. A GPU machine may have no package index, so
   nothing is installed: a missing package stops the check here, naming it.
2. ``tests``: every test that needs CUDA (``pytest -k cuda``): the contract suite on CUDA
   (tests/test_cuda_contract.py: float32 against the CPU, float16 and bfloat16 autocast
   forward and backward, channels_last, float64 gradcheck, ``torch.compile(dynamic=True)`` of
   the fused-fusion blocks), test_contract's CUDA autocast cases, and the fused WeightedFusion
   op on CUDA (float32/float16/bfloat16, channels_last, float64 gradcheck, compile).
3. ``train-<study>``: each study's train script on generated data with ``--amp`` on CUDA,
   killed (SIGKILL) after its first checkpoint and finished with ``--resume``; the resumed
   run must report every epoch.
4. ``bench-*``: ``python -m benchmarks.run --device cuda`` in float32 and in bfloat16 +
   channels-last, at the default sizes and at the training size (EfficientDet-D0: batch 16 at
   512 x 512), writing ``benchmarks/results/cuda-<gpu>-*.json`` and ``.md``.

Steps not started within ``--budget-s`` are reported as not run (rerun them alone with
``--skip``). The summary (each step: ok or failed, seconds, detail), with the GPU, torch
version, git commit and whether the tree was clean, is printed and written to
``benchmarks/results/cuda-<gpu>-gpu-check.json``. ``--dry-run`` runs only the parts that need
no GPU: the environment check (reporting, not stopping), the list of steps and their commands,
and the commit; ``make test`` runs it.

    python -m benchmarks.gpu_check                 # the whole check
    python -m benchmarks.gpu_check --dry-run       # what it would run, on any machine
    python -m benchmarks.gpu_check --skip train    # steps whose name starts with "train" left out
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["REQUIREMENTS", "Step", "check_environment", "main", "plan"]

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BUDGET_S = 360.0

REQUIREMENTS: dict[str, str] = {
    "torch": "torch built with CUDA (pip install torch --index-url .../whl/cu12x)",
    "triton": "triton (ships with CUDA builds of torch on Linux)",
    "torchvision": "torchvision",
    "timm": "timm (pip install timm)",
    "effdet": "effdet (pip install effdet)",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "sklearn": "scikit-learn (the digits data of the train steps)",
}
"""Module -> what to install; the check installs nothing."""

EPOCHS = 4
STUDIES: dict[str, list[str]] = {
    "dfpn_classifier": ["--model", "resnet50", "--dataset", "digits", "--image-size", "32",
                        "--batch-size", "16", "--limit", "128"],
    "detector_neck": ["--neck", "bifpn", "--dataset", "digits-canvas", "--backbone",
                      "efficientnet_tiny", "--image-size", "64", "--batch-size", "16",
                      "--limit", "64"],
    "dilatednet": ["--dataset", "digits-canvas", "--image-size", "64", "--width", "8",
                   "--fc-channels", "32", "--batch-size", "8", "--limit", "32"],
    "resizer_classifier": ["--model", "vgg16_resizer_cbam", "--dataset", "digits", "--arch",
                           "vgg_tiny", "--output-size", "32", "--image-size", "16",
                           "--batch-size", "16", "--limit", "128"],
}
"""Each study's train script at a tiny size on generated (bundled) data."""

BENCH_RUNS: dict[str, list[str]] = {
    "float32": [],
    "bfloat16-channels-last": ["--dtype", "bfloat16", "--channels-last"],
    "float32-train": ["--size", "train"],
    "bfloat16-channels-last-train": ["--dtype", "bfloat16", "--channels-last", "--size", "train"],
}
BENCH_BUDGET_S = 0.4
"""Seconds of timing per case and mode (benchmarks.run's default is 8; four runs of every case
must fit in the six minutes)."""


@dataclass
class Step:
    """One step: ``run(self)`` returns a detail line and raises on failure."""

    name: str
    description: str
    run: Callable[[Step], str]
    timeout_s: float
    ok: bool | None = None
    seconds: float = 0.0
    detail: str = ""
    outputs: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    path = [str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}


def check_environment() -> tuple[dict[str, str], list[str]]:
    """What is installed (module -> version or a reason) and the list of what is missing, each
    named as :data:`REQUIREMENTS` says."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for module, what in REQUIREMENTS.items():
        if importlib.util.find_spec(module) is None:
            found[module] = "missing"
            missing.append(what)
            continue
        try:
            found[module] = getattr(__import__(module), "__version__", "installed")
        except Exception as error:  # a broken install is as good as none
            found[module] = f"fails to import: {error}"
            missing.append(f"{what} (imports with {type(error).__name__}: {error})")
    if found["torch"] != "missing" and not found["torch"].startswith("fails"):
        import torch

        if torch.version.cuda is None:
            found["cuda"] = "torch is a CPU-only build"
            missing.append("a CUDA build of torch (this one is CPU-only)")
        elif not torch.cuda.is_available():
            found["cuda"] = f"CUDA {torch.version.cuda} build, no GPU visible"
            missing.append("a visible CUDA GPU (torch.cuda.is_available() is False)")
        else:
            found["cuda"] = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}"
    return found, missing


def _gpu_slug() -> str:
    """``h200`` for "NVIDIA H200": the GPU's name as the results' file names use it."""
    import torch

    if not torch.cuda.is_available():
        return "gpu"
    name = torch.cuda.get_device_name(0).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def _run(command: list[str], timeout_s: float, log: Path) -> str:
    """Run ``command`` in the repository, its output into ``log``; raise with the output's tail
    when it fails."""
    with log.open("w") as out:
        done = subprocess.run(command, cwd=REPO, env=_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=timeout_s)
    text = log.read_text()
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {_tail(text)}")
    return _tail(text, 1)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _tests_step(scratch: Path, timeout_s: float) -> Step:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda",
               "-m", "", "-rs", "tests"]

    def run(step: Step) -> str:
        summary = _run(command, step.timeout_s, scratch / "tests.log")
        if "passed" not in summary:
            raise RuntimeError(f"no CUDA test passed: {summary}")
        return summary

    return Step("tests", shlex.join(command[1:]), run, timeout_s)


def _train_step(study: str, flags: list[str], scratch: Path, timeout_s: float) -> Step:
    out = scratch / f"train-{study}"
    base = [sys.executable, "-m", f"examples.{study}.train", *flags, "--epochs", str(EPOCHS),
            "--device", "cuda", "--amp", "--quiet", "--out", str(out)]

    def run(step: Step) -> str:
        deadline = time.monotonic() + step.timeout_s
        log = (scratch / f"train-{study}-killed.log").open("w")
        victim = subprocess.Popen(base, cwd=REPO, env=_env(), stdout=log,
                                  stderr=subprocess.STDOUT)
        while not (out / "checkpoint.pt").exists() and victim.poll() is None:
            if time.monotonic() > deadline:
                victim.kill()
                raise RuntimeError("no checkpoint before the time limit")
            time.sleep(0.02)
        if victim.poll() is not None:
            log.close()
            text = (scratch / f"train-{study}-killed.log").read_text()
            raise RuntimeError(f"ended (exit {victim.returncode}) before the kill: {_tail(text)}")
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        log.close()
        _run([*base, "--resume"], max(1.0, deadline - time.monotonic()),
             scratch / f"train-{study}-resumed.log")
        history = json.loads((out / "metrics.json").read_text())["history"]
        epochs = [h["epoch"] for h in history]
        if epochs != list(range(1, EPOCHS + 1)):
            raise RuntimeError(f"epochs after the resume: {epochs}, expected 1 to {EPOCHS}")
        last = {k: v for k, v in history[-1].items() if isinstance(v, (int, float))}
        return f"killed after the first checkpoint, resumed to epoch {EPOCHS}: {last}"

    return Step(f"train-{study}", shlex.join(base[1:]) + " (SIGKILL, then --resume)", run,
                timeout_s)


def _bench_step(label: str, flags: list[str], results: Path, slug: str, scratch: Path,
                timeout_s: float) -> Step:
    stem = results / f"cuda-{slug}-{label}"
    command = [sys.executable, "-m", "benchmarks.run", "--device", "cuda", *flags, "--budget-s",
               str(BENCH_BUDGET_S), "--json", f"{stem}.json", "--markdown", f"{stem}.md"]

    def run(step: Step) -> str:
        _run(command, step.timeout_s, scratch / f"bench-{label}.log")
        data = json.loads(Path(f"{stem}.json").read_text())
        step.outputs = [f"{stem}.json", f"{stem}.md"]
        ratios = {f"{row['name']} vs {row['peer']} {row['mode']}": round(row["ratio"], 3)
                  for row in data["cases"]}
        return json.dumps(ratios)

    return Step(f"bench-{label}", shlex.join(command[1:]), run, timeout_s)


def plan(results: Path, scratch: Path, slug: str, skip: list[str]) -> list[Step]:
    """The steps after the environment check, leaving out those whose name starts with an
    entry of ``skip``."""
    steps = [_tests_step(scratch, 150)]
    steps += [_train_step(study, flags, scratch, 45) for study, flags in STUDIES.items()]
    steps += [_bench_step(label, flags, results, slug, scratch, 100)
              for label, flags in BENCH_RUNS.items()]
    return [s for s in steps if not any(s.name.startswith(prefix) for prefix in skip)]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true",
                        help="only what needs no GPU: the environment, the steps, the commit")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the results (default benchmarks/results; a "
                        "dry run writes its summary only when given)")
    parser.add_argument("--skip", action="append", default=[], metavar="PREFIX",
                        help="leave out steps whose name starts with PREFIX (repeatable): "
                        "tests, train, train-detector_neck, bench, bench-float32, ...")
    parser.add_argument("--commit", metavar="HASH",
                        help="the commit this tree is, where it is a copy without .git "
                        "(sets DILCONV_COMMIT for every step)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="steps not started by then are left out and reported")
    return parser.parse_args(argv)


def _summary(steps: list[Step], meta: dict) -> dict:
    return {"meta": meta, "steps": [
        {"name": s.name, "ok": s.ok, "seconds": round(s.seconds, 1), "command": s.description,
         "detail": s.detail, "outputs": s.outputs} for s in steps
    ]}


def _print_summary(steps: list[Step]) -> None:
    print("\nsummary")
    for s in steps:
        state = {True: "ok", False: "FAILED", None: "not run"}[s.ok]
        first = s.detail.splitlines()[-1] if s.detail else ""
        print(f"  {s.name:<36}{state:>8}{s.seconds:>8.1f} s  {first[:100]}")


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when every step passed, 1 when one failed, 2 when the environment
    lacks something (a dry run: 0 whatever is missing)."""
    args = _parse(argv)
    if args.commit:
        os.environ["DILCONV_COMMIT"] = args.commit
    from benchmarks.run import git_state

    started = time.monotonic()
    found, missing = check_environment()
    meta: dict = {
        **git_state(), "python": platform.python_version(), "environment": found,
        "missing": missing, "dry_run": args.dry_run, "budget_s": args.budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"commit {meta['commit']} ({'clean' if meta['clean'] else 'local changes'})")
    for module, state in found.items():
        print(f"  {module:<12}{state}")
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        if not args.dry_run:
            print("install these, then run the check again (it installs nothing)",
                  file=sys.stderr)
            return 2
    slug = _gpu_slug() if not missing else "gpu"
    results = args.out or RESULTS
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        steps = plan(results, Path(scratch), slug, args.skip)
        print(f"{len(steps)} steps" + (" (dry run: not run)" if args.dry_run else ""))
        for s in steps:
            print(f"  {s.name:<36}limit {s.timeout_s:>4.0f} s  {s.description}")
        if not args.dry_run:
            results.mkdir(parents=True, exist_ok=True)
            _run_steps(steps, started, args.budget_s)
    _print_summary(steps)
    meta["seconds"] = round(time.monotonic() - started, 1)
    if args.dry_run and args.out is None:
        return 0
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"cuda-{slug}-gpu-check{'-dry-run' if args.dry_run else ''}.json"
    path.write_text(json.dumps(_summary(steps, meta), indent=2) + "\n")
    print(f"wrote {path}")
    return 0 if args.dry_run or all(s.ok for s in steps) else 1


def _run_steps(steps: list[Step], started: float, budget_s: float) -> None:
    for step in steps:
        left = budget_s - (time.monotonic() - started)
        if left < 20:
            step.detail = f"not started: the check's {budget_s:.0f} s budget is spent"
            continue
        step.timeout_s = min(step.timeout_s, left)
        print(f"\n== {step.name}: {step.description}", flush=True)
        begin = time.monotonic()
        try:
            step.detail = step.run(step)
            step.ok = True
        except Exception as error:  # one failed step must not stop the others
            step.ok = False
            step.detail = f"{type(error).__name__}: {error}"
        step.seconds = time.monotonic() - begin
        print(f"   {'ok' if step.ok else 'FAILED'} in {step.seconds:.1f} s: "
              f"{step.detail.splitlines()[-1] if step.detail else ''}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
