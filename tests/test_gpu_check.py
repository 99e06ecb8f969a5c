"""benchmarks/gpu_check.py's parts that need no GPU: --dry-run, the environment check, the
steps it plans, the commit it records, and its refusal to start without what it needs."""

from __future__ import annotations

import json
import re

import pytest
import torch
from benchmarks import gpu_check
from benchmarks.run import git_state


def test_dry_run_lists_every_step_and_records_the_commit(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    written = list(tmp_path.glob("cuda-*-gpu-check-dry-run.json"))
    assert len(written) == 1
    summary = json.loads(written[0].read_text())
    meta, steps = summary["meta"], summary["steps"]
    assert meta["dry_run"] is True
    assert {k: meta[k] for k in ("commit", "clean")} == git_state()
    assert set(gpu_check.REQUIREMENTS) <= set(meta["environment"])
    names = [s["name"] for s in steps]
    assert names[0] == "tests"
    assert {f"train-{study}" for study in gpu_check.STUDIES} <= set(names)
    assert {f"bench-{label}" for label in gpu_check.BENCH_RUNS} <= set(names)
    assert all(s["ok"] is None for s in steps)  # nothing ran
    for step in steps:
        assert step["name"] in out and step["command"] in out
    commands = {s["name"]: s["command"] for s in steps}
    assert "-k cuda" in commands["tests"]
    for study in gpu_check.STUDIES:
        assert re.search(r"--device cuda --amp", commands[f"train-{study}"])
        assert "--resume" in commands[f"train-{study}"]
    assert "--dtype bfloat16 --channels-last" in commands["bench-bfloat16-channels-last"]
    assert "--size train" in commands["bench-float32-train"]
    for label in gpu_check.BENCH_RUNS:
        assert f"cuda-gpu-{label}.json" in commands[f"bench-{label}"] or torch.cuda.is_available()


def test_dry_run_without_out_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")
    assert gpu_check.main(["--dry-run"]) == 0
    assert not (tmp_path / "results").exists()


def test_skip_leaves_out_steps_by_prefix(tmp_path):
    steps = gpu_check.plan(tmp_path, tmp_path, "gpu", ["train", "bench-float32"])
    names = [s.name for s in steps]
    assert not any(n.startswith("train") for n in names)
    assert "bench-float32" not in names and "bench-float32-train" not in names
    assert "bench-bfloat16-channels-last" in names and "tests" in names


def test_environment_check_names_what_is_missing(monkeypatch):
    monkeypatch.setitem(gpu_check.REQUIREMENTS, "dilconv_no_such_module", "the thing (pip)")
    found, missing = gpu_check.check_environment()
    assert found["dilconv_no_such_module"] == "missing"
    assert "the thing (pip)" in missing
    if not torch.cuda.is_available():
        assert any("CUDA" in m for m in missing)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_check_stops_and_says_why(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "missing:" in err and "CUDA" in err and "installs nothing" in err
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_commit_flag_names_a_copy_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.subprocess, "run", _no_git(gpu_check.subprocess.run))
    monkeypatch.setenv("DILCONV_COMMIT", "")  # restored after the check sets it
    assert gpu_check.main(["--dry-run", "--commit", "f00d", "--out", str(tmp_path)]) == 0
    summary = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert summary["meta"]["commit"] == "f00d" and summary["meta"]["clean"] is None


def _no_git(real):
    def run(command, *args, **kwargs):
        if command[0] == "git":
            raise FileNotFoundError("git")
        return real(command, *args, **kwargs)

    return run
