"""Seed 002 in ``make demo``: DilatedNet's front-end alone, with the basic and with the large
context module (Yu & Koltun, ICLR 2016), trained briefly on digit canvases.

The procedure is the paper's: stage 1 trains the front-end; stage 2 puts an identity-initialised
context module on the trained front-end (:meth:`DilatedNet.add_context`) and trains the whole
network. Each stage-2 network is scored before training as well, beside the front-end alone
(:func:`~examples.dilatednet.train.compare_stage2_start`): the context module's ReLUs clip the
front-end's negative scores, so stage 2 does not start exactly where stage 1 ended. A fourth row
trains the front-end alone for the stage-2 epochs too, so that a gain of the context rows can be
told from the gain of training longer.

Everything is scaled down to about two minutes on two CPU cores (the printed caption says what,
:func:`scaled_down`); the paper's figures are Pascal VOC 2012 at full size with a
VGG16 from ImageNet. The table shows the procedure working, not the paper's accuracy.

Run alone: ``python -m examples.dilatednet.demo --out runs/demo``.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassJaccardIndex

from examples.dilatednet.data import CANVAS_CLASSES, IGNORE_INDEX
from examples.dilatednet.models import DilatedNet
from examples.dilatednet.train import TASK, compare_stage2_start
from examples.harness import TrainConfig, fit
from examples.harness.checkpoint import atomic_write
from examples.harness.distributed import Dist, setup

__all__ = ["PREDICTIONS_PNG", "background_miou", "draw_predictions", "main", "print_table", "run",
           "scaled_down"]

PREDICTIONS_PNG = "dilatednet_predictions.png"


def scaled_down(*, width: int, fc_channels: int, image_size: int, train: int, val: int,
                batch_size: int, epochs: int, context_epochs: int) -> str:
    """What a :func:`run` scales down, each figure beside the paper's (VOC 2012, VGG16)."""
    return (f"width {width} (VGG16: 64), fc6/fc7 {fc_channels} channels (4096), "
            f"{image_size}x{image_size} digit canvases, {train} train / {val} val, 11 classes "
            f"(VOC 2012: photos up to 500x500, 21 classes), no ImageNet weights, no dropout "
            f"(0.5), AdamW with batch {batch_size} for {epochs} + {context_epochs} epochs "
            f"(SGD, batch 14, 60K iterations)")


def _config(name: str, out: Path, epochs: int, *, image_size: int, batch_size: int, lr: float,
            limit: int | None, seed: int, device: str, quiet: bool) -> TrainConfig:
    return TrainConfig(model=name, out=out / name, dataset="digits-canvas", image_size=image_size,
                       epochs=epochs, batch_size=batch_size, optimizer="adamw", lr=lr,
                       limit=limit, seed=seed, device=device, quiet=quiet, checkpoint=False)


def _train(config: TrainConfig, net: DilatedNet, info: Dist) -> tuple[dict, float]:
    """Train ``net`` in place (fit's factory hands it over); return the final figures and
    the seconds taken."""
    start = time.perf_counter()
    metrics = fit(config, lambda num_classes: net, info, TASK)
    return metrics["final"], time.perf_counter() - start


def _row(name: str, epochs: str, final: dict, net: nn.Module, seconds: float,
         start: dict | None = None) -> dict:
    row = {"network": name, "epochs": epochs, "miou": final["miou"],
           "pixel_acc": final["pixel_acc"], "parameters": sum(p.numel() for p in net.parameters()),
           "seconds": seconds}
    if start is not None:
        row.update(start_miou=start["stage2_start"]["miou"],
                   frontend_miou=start["frontend"]["miou"], changed_pixels=start["changed_pixels"])
    return row


def run(out: Path, *, epochs: int = 14, context_epochs: int = 1, image_size: int = 96,
        width: int = 4, fc_channels: int = 64, batch_size: int = 4, lr: float = 1e-3,
        limit: int | None = None, seed: int = 0, device: str = "cpu", samples: int = 4,
        threads: int | None = 1, quiet: bool = True) -> list[dict]:
    """Train the front-end, then each context variant on it; print the table; draw predictions.

    Nothing is checkpointed, so the demo can run again into the same folder; curves and
    ``metrics.json`` of each run go to ``out/dilatednet/<run>/``, the figure to
    ``out/dilatednet_predictions.png``.

    Args:
        out: the demo's output folder.
        epochs: front-end (stage 1) epochs.
        context_epochs: stage-2 epochs of each context variant (and of the front-end control).
        image_size: side of the square canvases.
        width: conv1's channels (VGG16: 64).
        fc_channels: fc6/fc7 channels (VGG16: 4096).
        batch_size: per step.
        lr: AdamW's peak learning rate, annealed on a cosine in each stage.
        limit: at most this many train and val canvases (default all, 512 and 128).
        seed: seed of the weights, the train canvases and the order.
        device: where to train.
        samples: val canvases in the figure.
        threads: torch's CPU threads for the section (restored afterwards; None: leave them).
            One by default: on a 2-core machine shared with other work, two OpenMP threads
            were measured 3.5 times slower than one (they wait for each other); on the idle
            machine two were only 1.2 times faster than one.
        quiet: hide the per-epoch lines.

    Returns:
        One row per network: network, epochs, miou, pixel_acc, parameters, seconds (of its own
        stage), and for the stage-2 rows start_miou, frontend_miou, changed_pixels.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(out, epochs, context_epochs, image_size, width, fc_channels, batch_size, lr,
                    limit, seed, device, samples, quiet)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, epochs: int, context_epochs: int, image_size: int, width: int,
         fc_channels: int, batch_size: int, lr: float, limit: int | None, seed: int,
         device: str, samples: int, quiet: bool) -> list[dict]:
    info = setup(device)
    root = out / "dilatednet"
    common = {"image_size": image_size, "batch_size": batch_size, "lr": lr, "limit": limit,
              "seed": seed, "device": device, "quiet": quiet}
    torch.manual_seed(seed)
    frontend = DilatedNet(len(CANVAS_CLASSES), width=width, fc_channels=fc_channels, dropout=0.0)
    stage1 = _config("frontend", root, epochs, **common)
    final, seconds = _train(stage1, frontend, info)
    rows = [_row("front-end", str(epochs), final, frontend, seconds)]
    train, val, _ = TASK.datasets(stage1)
    nets = {"front-end": frontend}
    for variant in ("basic", "large"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = frontend.add_context(variant)
        start = compare_stage2_start(frontend, net, val, len(CANVAS_CLASSES), stage1, info)
        final, seconds = _train(_config(variant, root, context_epochs, **common), net, info)
        rows.append(_row(f"+ {variant} context", f"{epochs}+{context_epochs}", final, net,
                         seconds, start))
        nets[f"+ {variant}"] = net
    control = copy.deepcopy(frontend)
    final, seconds = _train(_config("frontend_control", root, context_epochs, **common),
                            control, info)
    rows.append(_row("front-end (control)", f"{epochs}+{context_epochs}", final, control,
                     seconds))
    print_table(rows, "scaled down: " + scaled_down(
        width=width, fc_channels=fc_channels, image_size=image_size, train=len(train),
        val=len(val), batch_size=batch_size, epochs=epochs, context_epochs=context_epochs),
        background_miou(val))
    path = draw_predictions(nets, [val[i] for i in range(min(samples, len(val)))],
                            out / PREDICTIONS_PNG)
    print(f"predictions: {path}")
    return rows


def background_miou(val: Dataset, num_classes: int = len(CANVAS_CLASSES)) -> float:
    """Mean IoU of predicting class 0 (background) for every pixel of ``val``'s masks."""
    iou = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX)
    for index in range(len(val)):
        mask = val[index][1]
        iou.update(torch.zeros_like(mask), mask)
    return float(iou.compute())


def print_table(rows: Sequence[dict], caption: str, background: float) -> None:
    """Print :func:`run`'s rows, the start of stage 2 beside the front-end, ``caption`` and the
    mean IoU of predicting ``background`` everywhere."""
    print("DilatedNet (seed 002) on digit canvases: the paper's figures are Pascal VOC 2012 at "
          f"full size; {caption}")
    header = (f"{'network':<22}{'epochs':>7}{'mIoU':>8}{'pixel acc':>11}{'params':>11}"
              f"{'seconds':>9}  start of stage 2")
    print(header)
    print("-" * len(header))
    for row in rows:
        start = ""
        if "start_miou" in row:
            start = (f"mIoU {row['start_miou']:.3f} vs front-end {row['frontend_miou']:.3f} "
                     f"({row['start_miou'] - row['frontend_miou']:+.3f}; "
                     f"{row['changed_pixels']:.1%} of pixels changed)")
        print(f"{row['network']:<22}{row['epochs']:>7}{row['miou']:>8.3f}"
              f"{100 * row['pixel_acc']:>10.1f}%{row['parameters']:>11,}{row['seconds']:>9.1f}  "
              f"{start}")
    print(f"predicting background everywhere scores mIoU {background:.3f} on these val canvases; "
          "'start of stage 2' is the untrained context module on the trained front-end (its "
          "ReLUs clip negative scores)")


@torch.no_grad()
def draw_predictions(nets: dict[str, nn.Module], samples: Sequence[tuple], path: Path,
                     classes: Sequence[str] = CANVAS_CLASSES, dpi: int = 100) -> Path:
    """Write a PNG: one row per ``(image, mask)`` sample; image, ground truth, then each net's
    predicted classes (eval mode, on the CPU; modes are left in eval).

    Returns:
        ``path`` (its folder is created).
    """
    colours = ListedColormap(["black", *colormaps["tab10"].colors[:len(classes) - 1]])
    columns = ["image", "ground truth", *nets]
    fig = Figure(figsize=(1.6 * len(columns), 1.6 * len(samples) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(samples), len(columns), squeeze=False)
    images = torch.stack([image for image, _ in samples])
    predicted = {name: net.cpu().eval()(images).argmax(1) for name, net in nets.items()}
    for i, (image, mask) in enumerate(samples):
        axes[i, 0].imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
        maps = [mask, *(predicted[name][i] for name in nets)]
        for ax, labels in zip(axes[i, 1:], maps, strict=True):
            ax.imshow(labels.numpy(), cmap=colours, vmin=0, vmax=len(classes) - 1,
                      interpolation="nearest")
    for ax, title in zip(axes[0], columns, strict=True):
        ax.set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Patch(color=colours(k), label=name) for k, name in enumerate(classes)]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(classes), fontsize=7,
               handlelength=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the section alone (``python -m examples.dilatednet.demo``); returns 0."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    parser.add_argument("--epochs", type=int, default=14, help="front-end epochs")
    parser.add_argument("--context-epochs", type=int, default=1, help="stage-2 epochs")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run(args.out, epochs=args.epochs, context_epochs=args.context_epochs)
    print(f"[DilatedNet section: {time.perf_counter() - start:.1f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
