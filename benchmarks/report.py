"""What the benchmark prints and writes: the header, one progress line per case, JSON, Markdown."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

__all__ = [
    "REQUIRED_KEYS", "device_name", "header", "main", "progress", "to_markdown", "write_json",
]

REQUIRED_KEYS = ("name", "peer", "mode", "dtype", "device", "ours_ms", "peer_ms", "ratio")
"""Keys every case of the JSON has (the figures of the limits follow where they apply)."""

_COLUMNS = (
    ("case", "name", None),
    ("peer", "peer", None),
    ("mode", "mode", None),
    ("ours ms", "ours_ms", "num"),
    ("IQR", "ours_iqr_ms", "num"),
    ("peer ms", "peer_ms", "num"),
    ("IQR", "peer_iqr_ms", "num"),
    ("ours/peer", "ratio", ".2f"),
    ("ours img/s", "ours_images_per_s", "num"),
    ("GFLOP/s", "ours_gflop_s", "num"),
    ("GB/s", "ours_gb_s", "num"),
    ("block/convs", "conv_ratio", ".2f"),
    ("dilation cost", "dilation_cost", ".2f"),
    ("peak MiB ours", "ours_peak_mib", "num"),
    ("peak MiB peer", "peer_peak_mib", "num"),
    ("slow path", "slow_path", None),
)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model from /proc/cpuinfo (``platform.processor()`` else)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(meta: dict) -> str:
    """Lines naming the machine and the settings, printed before the first case."""
    return "\n".join([
        f"device: {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"threads {meta['threads']}",
        f"dtype {meta['dtype']} ({meta['precision']}), channels_last {meta['channels_last']}, "
        f"compile {meta['compile']}, deterministic {meta['deterministic']}, "
        f"quick {meta['quick']}",
        f"fwd: eval mode, no grad; fwd+bwd: train mode, {meta['backward']}",
        f"{'case':<70}{'mode':>8}{'ours ms':>10}{'peer ms':>10}{'ratio':>7}",
    ])


def progress(row: dict) -> str:
    """One line per case and mode: name, mode, both times and the ratio."""
    label = f"{row['name']} vs {row['peer']}"
    line = (f"{label:<70.70}{row['mode']:>8}{row['ours_ms']:>10.3f}{row['peer_ms']:>10.3f}"
            f"{row['ratio']:>7.2f}")
    extra = [f"{key}={row[key]:.2f}" for key in ("conv_ratio", "dilation_cost")
             if row.get(key) is not None]
    if row.get("noisy"):
        extra.append("noisy (IQR > 25% of the median)")
    return line + ("  " + " ".join(extra) if extra else "")


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "cases": rows}, indent=2) + "\n")


def _number(value: float) -> str:
    """About three significant digits, never in exponent notation."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.3g}"
    return f"{value:.3g}" if value else "0"


def _cell(row: dict, key: str, fmt: str | None) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "**yes**" if value else "no"
    if fmt == "num":
        return _number(value)
    return format(value, fmt) if fmt else str(value).replace("|", "\\|")


def _provenance(meta: dict) -> str:
    """Sentences naming the size, the commit measured and whether the tree was clean, where
    the run recorded them."""
    text = " At the training size (batch 16, 512 x 512 images)." if meta.get(
        "size") == "train" else ""
    if meta.get("commit"):
        state = {True: " (clean tree)", False: " (tree with local changes)"}.get(
            meta.get("clean"), "")
        text += f" Commit {meta['commit'][:12]}{state}."
    return text


def to_markdown(meta: dict, rows: list[dict]) -> str:
    """One table, one row per case and mode; the limit columns are blank where they do not
    apply."""
    lines = [
        f"Device {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['dtype']} ({meta['precision']}), channels_last "
        f"{meta['channels_last']}, compile {meta['compile']}, deterministic "
        f"{meta['deterministic']}. Times are medians over {meta['rounds'][0]} to "
        f"{meta['rounds'][1]} interleaved blocks (fewer for slow cases); "
        "ratio = ours / peer (below 1: ours is faster)." + _provenance(meta),
        "",
        "| " + " | ".join(title for title, _, _ in _COLUMNS) + " |",
        "|" + "|".join("---" for _ in _COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for _, key, fmt in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report RESULT.json``: print the Markdown table of a saved run."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__)
    parser.add_argument("result", type=Path, help="JSON written by benchmarks.run --json")
    data = json.loads(parser.parse_args(argv).result.read_text())
    print(to_markdown(data["meta"], data["cases"]), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
