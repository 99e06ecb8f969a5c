"""The benchmark runner's output: structure only, never a timing."""

from __future__ import annotations

import json
import math
import re
import subprocess

import pytest

pytest.importorskip("timm")

from benchmarks import run  # noqa: E402
from benchmarks.cases import CASES, Case, PlainSum  # noqa: E402
from benchmarks.report import REQUIRED_KEYS  # noqa: E402

# The pairs of issue 14, item 2, as (pattern on ours, pattern on the peer).
PAIRS = [
    ("^FPNNeck$", "torchvision FeaturePyramidNetwork"),
    ("^CBAM$", "timm CbamModule"),
    ("^WeightedFusion", "effdet FpnCombine fastattn"),
    ("^WeightedFusion", "plain sum"),
    ("^BiFPN", "effdet BiFpn"),
    ("DilatedResNet-50 layer4", "torchvision resnet50 layer4"),
    ("from_torchvision OS8", "torchvision resnet50 OS8"),
    ("LearnableResizer", "bilinear"),
    ("seed 000", "torchvision resnet50"),
    ("seed 001", "torchvision FPN"),
    ("seed 003", "bilinear \\+ VGG16"),
]
# Fast pairs that between them exercise every figure: bandwidth, the convolutions-alone
# ratio, the cost of dilation and the profiler's kernel check.
SUBSET = r"^CBAM|WeightedFusion\(2\) vs plain|Conv3x3 dilation 2"


def _matches(case: Case, ours: str, peer: str) -> bool:
    return bool(re.search(ours, case.name) and re.search(peer, case.peer))


@pytest.mark.parametrize(("ours", "peer"), PAIRS)
def test_every_pair_is_a_case(ours, peer):
    assert any(_matches(case, ours, peer) for case in CASES)


def test_case_labels_are_unique():
    labels = [case.label for case in CASES]
    assert len(labels) == len(set(labels))


def test_select_cases_filters_by_pattern():
    chosen = run.select_cases("weightedfusion")
    assert chosen and all("WeightedFusion" in case.name for case in chosen)
    assert run.select_cases(None) == CASES


def _check_output(json_path, md_path, expected: list[Case]) -> list[dict]:
    data = json.loads(json_path.read_text())
    meta, rows = data["meta"], data["cases"]
    for key in ("device", "device_name", "torch", "threads", "dtype", "channels_last",
                "compile", "deterministic"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["quick"] is True
    seen = {(row["name"], row["peer"], row["mode"]) for row in rows}
    assert seen == {(c.name, c.peer, mode) for c in expected for mode in run.MODES}
    by_case = {(c.name, c.peer): c for c in expected}
    for row in rows:
        for key in REQUIRED_KEYS:
            assert key in row, (row["name"], key)
        assert isinstance(row["name"], str) and isinstance(row["peer"], str)
        assert row["mode"] in run.MODES
        assert row["dtype"] == "float32" and row["device"] == "cpu"
        for key in ("ours_ms", "peer_ms", "ratio"):
            assert isinstance(row[key], float) and row[key] > 0
        assert math.isclose(row["ratio"], row["ours_ms"] / row["peer_ms"], rel_tol=1e-9)
        case = by_case[(row["name"], row["peer"])]
        assert ("ours_gb_s" in row) == case.memory_bound
        assert ("conv_ratio" in row) == case.conv_ratio
        assert ("dilation_cost" in row) == case.dilation_cost
        if case.dilated:
            assert isinstance(row["slow_path"], bool)
            assert any("conv" in name for name in row["kernels"])
    table = [line for line in md_path.read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # the header, then one row per case and mode
    for row in rows:
        assert any(f"| {row['name']} | {row['peer']} | {row['mode']} |" in line for line in table)
    return rows


def test_quick_run_writes_every_selected_case(tmp_path, capsys):
    json_path, md_path = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--cases", SUBSET,
            "--json", str(json_path), "--markdown", str(md_path)]
    assert run.main(argv) == 0
    expected = run.select_cases(SUBSET)
    assert {case.memory_bound for case in expected} == {True, False}
    rows = _check_output(json_path, md_path, expected)
    out = capsys.readouterr().out
    assert "torch" in out and "threads 1" in out
    for row in rows:  # a progress line per case and mode
        assert re.search(re.escape(f"{row['name']} vs {row['peer']}"[:70]) + r"\s+" +
                         re.escape(row["mode"]), out)


@pytest.mark.slow
def test_quick_run_covers_every_pair(tmp_path):
    pytest.importorskip("effdet")
    json_path, md_path = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--json", str(json_path),
            "--markdown", str(md_path)]
    assert run.main(argv) == 0
    rows = _check_output(json_path, md_path, list(CASES))
    for ours, peer in PAIRS:
        modes = {r["mode"] for r in rows if re.search(ours, r["name"]) and re.search(peer,
                                                                                      r["peer"])}
        assert modes == set(run.MODES), (ours, peer)


def test_missing_package_skips_the_case(tmp_path, monkeypatch):
    import torch

    def build(quick: bool):
        return PlainSum(), PlainSum(), [torch.ones(1)]

    absent = Case("needs a package", "nothing", build, ("dilconv_no_such_package",))
    monkeypatch.setattr(run, "CASES", [absent])
    json_path = tmp_path / "b.json"
    assert run.main(["--quick", "--device", "cpu", "--json", str(json_path)]) == 0
    data = json.loads(json_path.read_text())
    assert data["cases"] == []
    assert data["meta"]["skipped"] == [
        {"case": absent.label, "missing": ["dilconv_no_such_package"]}
    ]


def test_meta_records_the_commit_and_whether_the_tree_was_clean(tmp_path, monkeypatch):
    json_path, md_path = tmp_path / "b.json", tmp_path / "b.md"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--cases", r"^CBAM", "--json",
            str(json_path), "--markdown", str(md_path)]
    assert run.main(argv) == 0
    meta = json.loads(json_path.read_text())["meta"]
    head = subprocess.run(["git", "-C", str(run.REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode != 0:  # not a git checkout (an sdist, say): recorded as unknown
        assert meta["commit"] is None and meta["clean"] is None
        return
    assert meta["commit"] == head.stdout.strip()
    assert isinstance(meta["clean"], bool) and meta["size"] == "default"
    assert f"Commit {meta['commit'][:12]}" in md_path.read_text().splitlines()[0]


def test_git_state_sees_a_changed_file_but_not_the_results(tmp_path, monkeypatch):
    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "y")
    state = run.git_state(tmp_path)
    assert state["clean"] is True and len(state["commit"]) == 40
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"new": 1}\n')
    assert run.git_state(tmp_path)["clean"] is True
    (tmp_path / "code.py").write_text("a = 2\n")
    assert run.git_state(tmp_path)["clean"] is False
    monkeypatch.delenv("DILCONV_COMMIT", raising=False)
    assert run.git_state(tmp_path / "nowhere") == {"commit": None, "clean": None}
    monkeypatch.setenv("DILCONV_COMMIT", "abc123")  # a copy of the tree without .git
    assert run.git_state(tmp_path / "nowhere") == {"commit": "abc123", "clean": None}


def test_training_size_cases(tmp_path):
    from benchmarks.cases import TRAINING_BATCH, training_cases

    chosen = run.select_cases(None, "train")
    assert [c.label for c in chosen] == [c.label for c in training_cases()]
    names = {case.name.split(" [")[0] for case in chosen}
    assert {"FPNNeck", "CBAM", "WeightedFusion(2)", "WeightedFusion(3)"} <= names
    assert any(name.startswith("BiFPN D0") for name in names)
    assert not any("shared" in name for name in names)
    fusion = next(c for c in chosen if c.name.startswith("WeightedFusion(3)"))
    _, _, maps = fusion.build(False)
    assert [tuple(m.shape) for m in maps] == [(TRAINING_BATCH, 64, 64, 64)] * 3
    json_path = tmp_path / "b.json"
    argv = ["--quick", "--device", "cpu", "--threads", "1", "--size", "train", "--cases",
            r"^CBAM", "--json", str(json_path)]
    assert run.main(argv) == 0
    data = json.loads(json_path.read_text())
    assert data["meta"]["size"] == "train"
    assert {row["name"] for row in data["cases"]} == {next(
        c.name for c in chosen if c.name.startswith("CBAM"))}
