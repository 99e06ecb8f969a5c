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


def _blocks() -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    """One typical configuration of every dilconv block, with the input it is shown on."""
    import dilconv as dc

    pyramid = (64, 128, 256)
    return [
        ("DilatedBottleneck(256, 64, dilation=2)", dc.DilatedBottleneck(256, 64, dilation=2),
         (256, 32, 32)),
        ("DilatedBasicBlock(64, 64, dilation=2)", dc.DilatedBasicBlock(64, 64, dilation=2),
         (64, 32, 32)),
        ("DilatedResNet(output_stride=8)", dc.DilatedResNet(output_stride=8), (3, 128, 128)),
        ("TransposedConvUpsampler(256, 256)", dc.TransposedConvUpsampler(256, 256), (256, 16, 16)),
        ("FPNNeck([64, 128, 256], 128)", dc.FPNNeck(pyramid, 128), pyramid),
        ("WeightedFusion(3)", dc.WeightedFusion(3), ()),
        ("BiFPN([64, 128, 256], 64, num_layers=3)", dc.BiFPN(pyramid, 64, 3), pyramid),
        ("CBAM(256)", dc.CBAM(256), (256, 32, 32)),
        ("LearnableResizer()", dc.LearnableResizer(), (3, 32, 32)),
        ("LearnableResizer(attention='cbam')", dc.LearnableResizer(attention="cbam"),
         (3, 32, 32)),
        ("ContextModule(21)", dc.ContextModule(21), (21, 64, 64)),
        ("ContextModule(21, 'large')", dc.ContextModule(21, "large"), (21, 64, 64)),
    ]


def blocks_table() -> None:
    """Print every block with its parameter count and the shape it maps one input to."""
    print(f"{'block':<42}{'params':>12}  input -> output")
    for title, block, shape in _blocks():
        params = sum(p.numel() for p in block.parameters())
        if not shape:
            print(f"{title:<42}{params:>12,}  (fuses same-shape maps)")
            continue
        if title.startswith(("FPNNeck", "BiFPN")):
            x = [torch.randn(1, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(shape)]
            shapes_in = " ".join("x".join(map(str, f.shape[1:])) for f in x)
        else:
            x = torch.randn(1, *shape)
            shapes_in = "x".join(map(str, shape))
        with torch.no_grad():
            y = block.eval()(x)
        ys = y if isinstance(y, list) else [y]
        shapes_out = " ".join("x".join(map(str, t.shape[1:])) for t in ys)
        print(f"{title:<42}{params:>12,}  {shapes_in} -> {shapes_out}")


def _table2(args: argparse.Namespace) -> None:
    from examples.dfpn_classifier.table2 import print_table2, run_table2

    rows = run_table2(args.out / "table2", epochs=args.epochs, image_size=args.image_size,
                      limit=args.limit, quiet=False)
    print_table2(rows)


def _receptive_fields(out: Path) -> None:
    from examples import receptive_fields

    receptive_fields.print_table(receptive_fields.receptive_field_table())
    print(f"heat maps: {receptive_fields.draw(out)}")


def _detector(out: Path) -> None:
    from examples.detector_neck import demo

    demo.level_table()
    demo.run(out)


def _dilatednet(out: Path) -> None:
    from examples.dilatednet import demo

    demo.run(out)


def _resizer(out: Path) -> None:
    from examples.resizer_classifier import demo

    demo.run(out / "resizer")


def _timed(title: str, part: Callable[[], object]) -> object:
    start = time.perf_counter()
    print(f"\n== {title} ==")
    result = part()
    print(f"[{title}: {time.perf_counter() - start:.1f} s]")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    # Sized so that the whole demo stays under 15 minutes on 2 CPU cores.
    parser.add_argument("--epochs", type=int, default=3, help="Table 2 training epochs")
    parser.add_argument("--image-size", type=int, default=16, help="Table 2 digit image size")
    parser.add_argument("--limit", type=int, default=None,
                        help="Table 2: use only this many training images (default: all 1437)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.perf_counter()
    ok = _timed("Table 1: parameter counts", table1)
    _timed("Table 2: the five networks trained briefly on digits", lambda: _table2(args))
    _timed("Receptive fields: paper vs measured", lambda: _receptive_fields(args.out))
    _timed("The blocks", blocks_table)
    _timed("Seed 001: an SSD detector with the study's four necks", lambda: _detector(args.out))
    _timed("Seed 002: DilatedNet front-end, + basic and + large context",
           lambda: _dilatednet(args.out))
    _timed("Seed 003: VGG behind a learnable resizer, Table 1 and figure 8",
           lambda: _resizer(args.out))
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s; outputs in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
