"""What the tests that launch train scripts as processes share: the environment, a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

__all__ = ["REPO", "kill_after_first_checkpoint", "subprocess_env"]

REPO = Path(__file__).resolve().parents[1]


def subprocess_env() -> dict[str, str]:
    """This environment with the repository importable and one OpenMP thread per process (two
    processes then share the two cores)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def kill_after_first_checkpoint(command: list[str], out: Path, epochs: int,
                                timeout: float = 300) -> int:
    """Run ``command``, SIGKILL it once ``out/checkpoint.pt`` exists; return the epochs done.

    Fails the test if the process ends first, no checkpoint comes within ``timeout`` seconds,
    or the kill comes too late (the run must die before its last epoch).
    """
    victim = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.pt").exists():
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, f"no checkpoint after {timeout} s"
        time.sleep(0.05)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    victim.stderr.close()
    done = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= done < epochs, "the run must die before its last epoch"
    return done
