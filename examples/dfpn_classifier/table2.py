"""Seed 000's Table 2 on real data this machine has: the five study networks trained briefly on
scikit-learn's bundled digits, printed next to the study's figures.

The study trained for 100 epochs with batch size 32 on its Kaggle tank images (3 classes,
256x256, on a GPU); no data set that downloads can be used here (SPEC section 4), so the
comparison is of the method, not of the numbers: every network gets the same seed, the same
digits split, the same optimiser (the harness default, AdamW + cosine) and the same few epochs.

Run alone: ``python -m examples.dfpn_classifier.table2 --epochs 2 --image-size 16``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from examples.dfpn_classifier.models import MODELS, PAPER_NAMES
from examples.harness import TrainConfig, fit

__all__ = ["PAPER_TABLE2", "main", "print_table2", "run_table2"]

# Seed 000, Table 2 ("epochs = 100, batch size = 32"): loss and test accuracy (%) on tank data.
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "resnet50": {"loss": 69.664, "accuracy": 38.0},
    "fpn": {"loss": 67.888, "accuracy": 43.0},
    "dfpn": {"loss": 67.810, "accuracy": 42.0},
    "dfpn_a": {"loss": 68.724, "accuracy": 45.0},
    "dfpn_b": {"loss": 69.421, "accuracy": 38.0},
}


def run_table2(out: Path, *, epochs: int = 2, image_size: int = 16, batch_size: int = 32,
               lr: float = 1e-3, limit: int | None = None, seed: int = 0, device: str = "cpu",
               models: Sequence[str] = tuple(MODELS), quiet: bool = True) -> list[dict]:
    """Train each of ``models`` on digits in this process; curves go to ``out/<model>/``.

    No checkpoints are written, so the demo can run again into the same folder.

    Returns:
        One row per model: model, epochs, image_size, device, num_classes, train_loss,
        test_loss, test_acc (final epoch, mean per image) and seconds (wall time of the run).
    """
    rows = []
    for name in models:
        config = TrainConfig(model=name, out=out / name, dataset="digits", image_size=image_size,
                             epochs=epochs, batch_size=batch_size, lr=lr, limit=limit, seed=seed,
                             device=device, quiet=quiet, checkpoint=False)
        start = time.perf_counter()
        metrics = fit(config, MODELS[name])
        final = metrics["final"]
        rows.append({"model": name, "epochs": epochs, "image_size": image_size,
                     "batch_size": batch_size, "device": metrics["device"],
                     "num_classes": metrics["num_classes"],
                     "train_loss": final["train_loss"], "test_loss": final["test_loss"],
                     "test_acc": final["test_acc"], "seconds": time.perf_counter() - start})
    return rows


def print_table2(rows: Sequence[dict]) -> None:
    """Print ``rows`` of :func:`run_table2` side by side with the study's Table 2."""
    first = rows[0]
    header = (f"{'model':<15}{'paper loss':>11}{'paper acc':>10}  |{'train loss':>11}"
              f"{'test loss':>10}{'test acc':>9}{'seconds':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        paper = PAPER_TABLE2[row["model"]]
        print(f"{PAPER_NAMES[row['model']]:<15}{paper['loss']:>11.3f}{paper['accuracy']:>9.0f}%"
              f"  |{row['train_loss']:>11.3f}{row['test_loss']:>10.3f}"
              f"{100 * row['test_acc']:>8.1f}%{row['seconds']:>9.1f}")
    chance = 100 / first["num_classes"]
    size = f"{first['image_size']}x{first['image_size']}"
    print("Paper: the study's tank images (3 classes, chance 33%), 256x256, 100 epochs, batch 32, "
          "GPU; its 'loss' looks like a sum over the epoch's ~64 batches (69.664 / 64 = 1.09, "
          "about ln 3).")
    print(f"Ours: scikit-learn digits ({first['num_classes']} classes, chance {chance:.0f}%), "
          f"{size}, {first['epochs']} epochs, batch {first['batch_size']}, "
          f"{first['device'].upper()}; losses are mean cross-entropy per image, accuracy on the "
          "held-out 20%.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/table2"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="at most N train and N test digits")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rows = run_table2(args.out, epochs=args.epochs, image_size=args.image_size, limit=args.limit,
                      device=args.device, quiet=False)
    print_table2(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
