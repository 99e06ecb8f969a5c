"""The main job (`make demo`): reproduce the studies' figures from real dilconv modules.

Each part prints a table and how long it took; figures and metrics go to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from examples.dfpn_classifier.models import MODELS, PAPER_NAMES, PAPER_PARAMS

__all__ = ["main", "table1"]


def _count(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def table1(image_size: int = 256) -> bool:
    """Print seed 000's Table 1, paper vs measured, with output shapes and FLOPs."""
    print(f"Table 1 (seed 000): parameters for num_classes=3; shapes and FLOPs for one "
          f"{image_size}x{image_size} image")
    header = (f"{'model':<15}{'paper':>13}{'measured':>13}{'trainable':>13}  ok  "
              f"{'features':<18}{'logits':<8}{'GFLOPs':>8}")
    print(header)
    print("-" * len(header))
    all_ok = True
    x = torch.randn(1, 3, image_size, image_size)
    for key, build in MODELS.items():
        model = build(num_classes=3).eval()
        total, trainable = _count(model)
        ok = total == trainable == PAPER_PARAMS[key]
        all_ok &= ok
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            logits = model(x)
        with torch.no_grad():
            features = model.forward_features(x)
        print(f"{PAPER_NAMES[key]:<15}{PAPER_PARAMS[key]:>13,}{total:>13,}{trainable:>13,}  "
              f"{'✓' if ok else '✗':<3} {'x'.join(map(str, features.shape[1:])):<18}"
              f"{'x'.join(map(str, logits.shape[1:])):<8}{counter.get_total_flops() / 1e9:>8.2f}")
    print("all five rows match the paper" if all_ok else "MISMATCH against the paper")
    return all_ok


def _timed(title: str, part: Callable[[], object]) -> object:
    start = time.perf_counter()
    print(f"\n== {title} ==")
    result = part()
    print(f"[{title}: {time.perf_counter() - start:.1f} s]")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    ok = _timed("Table 1: parameter counts", table1)
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s; outputs in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
