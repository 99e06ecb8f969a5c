"""Seed 003 at CPU scale: the study's six configurations (Table 1) trained briefly on digits, and
its figure 8 (bilinear vs Resizer_CBAM vs their difference) from the trained Resizer_CBAM.

The study fine-tunes an ImageNet VGG16 on CIFAR-10, enlarged from 32x32 to 224x224, for 300
epochs on a V100. No data set that downloads can be used here (SPEC section 4) and a CPU cannot
train that in minutes, so the comparison is of the method, not of the numbers: every
configuration gets the same seed, the same digits and the same few epochs of the narrow
``vgg_tiny``, from random weights. What is scaled down is printed under the table.

Run alone: ``python -m examples.resizer_classifier.demo --out runs/resizer-demo``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from examples.harness import fit
from examples.resizer_classifier.data import IMAGENET_MEAN, IMAGENET_STD, build_datasets
from examples.resizer_classifier.figure import resizer_figure
from examples.resizer_classifier.train import (
    RECIPE,
    RESIZERS,
    ResizerTask,
    model_factory,
    recipe_config,
)

__all__ = ["CONFIGS", "PAPER_TABLE1", "main", "print_table1", "run", "run_table1"]

# Seed 003, Table 1: test accuracy (%) on CIFAR-10 of (model, CutMix on).
PAPER_TABLE1: dict[tuple[str, bool], float] = {
    ("vgg16", False): 93.13,
    ("vgg16", True): 94.84,
    ("vgg16_resizer", False): 95.68,
    ("vgg16_resizer", True): 96.61,
    ("vgg16_resizer_cbam", False): 96.09,
    ("vgg16_resizer_cbam", True): 96.63,
}
# (row title, model, CutMix on), in the order of the study's Table 1.
CONFIGS: tuple[tuple[str, str, bool], ...] = (
    ("Baseline (VGG)", "vgg16", False),
    ("+CutMix", "vgg16", True),
    ("+Resizer", "vgg16_resizer", False),
    ("+Resizer +CutMix", "vgg16_resizer", True),
    ("+Resizer_CBAM", "vgg16_resizer_cbam", False),
    ("+Resizer_CBAM +CutMix", "vgg16_resizer_cbam", True),
)
FIGURE_IMAGES = 6


def run_table1(out: Path, *, epochs: int = 3, limit: int | None = None, image_size: int = 8,
               output_size: int = 32, arch: str = "vgg_tiny", batch_size: int = 32,
               lr: float = 1e-3, seed: int = 0,
               configs: Sequence[tuple[str, str, bool]] = CONFIGS
               ) -> tuple[list[dict], nn.Module | None]:
    """Train each of ``configs`` on digits in this process (CPU, no checkpoints; curves go to
    ``out/<model>[-cutmix]/``).

    The study's recipe (:func:`~examples.resizer_classifier.train.recipe_config`: crop,
    normalisation, CutMix with p 0.5 where on) with these changes: digits at ``image_size``
    (``limit`` train images), no flips, ``epochs`` epochs of batch ``batch_size``, AdamW at
    ``lr`` on the harness's cosine instead of SGD at 0.01 with steps (which barely moves in so
    few steps), and ``arch`` enlarging to ``output_size``.

    Returns:
        One row per configuration (title, model, cutmix, paper, test_acc of the last epoch,
        best_test_acc, parameters, seconds, and the settings), and the trained Resizer_CBAM
        model (the last one in ``configs``; None if there is none).
    """
    rows: list[dict] = []
    cbam: nn.Module | None = None
    for title, name, cutmix in configs:
        options = {"arch": arch, "output_size": output_size, "cutmix_p": 0.5 if cutmix else 0.0,
                   "hflip": False}
        config = recipe_config(
            name, out / (name + ("-cutmix" if cutmix else "")), dataset="digits",
            image_size=image_size, limit=limit, epochs=epochs, batch_size=batch_size,
            optimizer="adamw", lr=lr, weight_decay=0.01, lr_milestones=[], seed=seed,
            device="cpu", channels_last=True, quiet=True, checkpoint=False, options=options)
        built: list[nn.Module] = []
        factory = model_factory(name, arch=arch, output_size=output_size)

        def keep(num_classes: int, factory=factory, built=built) -> nn.Module:
            built.append(factory(num_classes=num_classes))
            return built[-1]

        start = time.perf_counter()
        metrics = fit(config, keep, task=ResizerTask())
        history = metrics["history"]
        rows.append({"title": title, "model": name, "cutmix": cutmix,
                     "paper": PAPER_TABLE1[name, cutmix], "test_acc": history[-1]["test_acc"],
                     "best_test_acc": max(h["test_acc"] for h in history),
                     "parameters": metrics["parameters"], "seconds": time.perf_counter() - start,
                     "num_classes": metrics["num_classes"],
                     "train_samples": metrics["train_samples"],
                     "test_samples": metrics["test_samples"],
                     "epochs": epochs, "image_size": image_size, "output_size": output_size,
                     "arch": arch, "batch_size": batch_size, "lr": lr})
        if RESIZERS[name] == "Resizer_CBAM":
            cbam = built[-1]
    return rows, cbam


def print_table1(rows: Sequence[dict]) -> None:
    """Print ``rows`` of :func:`run_table1` beside the study's Table 1 and say what differs."""
    header = (f"{'configuration':<23}{'paper':>8}  |{'last acc':>9}{'best acc':>9}"
              f"{'params':>12}{'seconds':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['title']:<23}{row['paper']:>7.2f}%  |{100 * row['test_acc']:>8.1f}%"
              f"{100 * row['best_test_acc']:>8.1f}%{row['parameters']:>12,}"
              f"{row['seconds']:>9.1f}")
    first = rows[0]
    size, out = first["image_size"], first["output_size"]
    print(f"Paper: CIFAR-10 (10 classes), ImageNet-pretrained VGG16 (134 M parameters), 32x32 -> "
          f"224x224, {RECIPE['epochs']} epochs, batch {RECIPE['batch_size']}, SGD lr "
          f"{RECIPE['lr']} x0.1 after epochs 100 and 150, on a V100; best epoch's accuracy.")
    print(f"Ours, scaled down: scikit-learn digits ({first['num_classes']} classes, chance "
          f"{100 / first['num_classes']:.0f}%; {first['train_samples']} train images, "
          f"{first['test_samples']} held out), {size}x{size} -> {out}x{out} "
          f"({out // size}x instead of 7x), "
          f"{first['arch']} (VGG16's layout at 1/8 width) from random weights, "
          f"{first['epochs']} epoch{'s' if first['epochs'] != 1 else ''}, batch "
          f"{first['batch_size']}, AdamW lr {first['lr']:g} "
          "with a cosine (SGD at 0.01 barely moves in so few steps), no flips (a mirrored "
          "digit is another shape); one CPU run each. At this scale the rows differ by noise; "
          "the study's gaps (up to 3.5 points) need its data and epochs.")


def run(out: Path, *, epochs: int = 3, limit: int | None = None, image_size: int = 8,
        output_size: int = 32, batch_size: int = 32, threads: int | None = 1,
        configs: Sequence[tuple[str, str, bool]] = CONFIGS) -> None:
    """Seed 003's demo section: train ``configs`` (:func:`run_table1`), print the table, and
    write figure 8 of the trained Resizer_CBAM to ``out/resizer_figure.png``.

    ``threads`` is torch's thread count while this runs (restored afterwards; None: leave it):
    one, because on a shared 2-core machine two threads ran these small convolutions 2-3 times
    slower than one.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        _run(out, epochs, limit, image_size, output_size, batch_size, configs)
    finally:
        torch.set_num_threads(before)


def _run(out: Path, epochs: int, limit: int | None, image_size: int, output_size: int,
         batch_size: int, configs: Sequence[tuple[str, str, bool]]) -> None:
    rows, cbam = run_table1(out, epochs=epochs, limit=limit, image_size=image_size,
                            output_size=output_size, batch_size=batch_size, configs=configs)
    print_table1(rows)
    if cbam is None:
        return
    config = recipe_config("vgg16_resizer_cbam", out, dataset="digits", image_size=image_size)
    _, test, classes = build_datasets(config)
    pairs = [test[i] for i in range(min(FIGURE_IMAGES, len(test)))]
    images = torch.stack([image for image, _ in pairs])
    path = resizer_figure(cbam, images, out / "resizer_figure.png", mean=IMAGENET_MEAN,
                          std=IMAGENET_STD, titles=[f"digit {classes[int(y)]}" for _, y in pairs])
    print(f"figure 8 (bilinear vs Resizer_CBAM vs difference, trained model): {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/resizer-demo"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="train images (all 1438)")
    parser.add_argument("--image-size", type=int, default=8, help="digit size (native: 8)")
    parser.add_argument("--output-size", type=int, default=32, help="resizer output (>= 32)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run(args.out, epochs=args.epochs, limit=args.limit, image_size=args.image_size,
        output_size=args.output_size)
    print(f"[seed 003: {time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
