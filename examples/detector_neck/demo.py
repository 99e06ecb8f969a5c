"""Seed 001's part of ``make demo``: the backbone's levels, the four necks trained briefly, boxes.

:func:`run` prints the study's EfficientNet-b4 level table beside the real network's at 512 x 640
(SPEC 3.2: the seed halves every level, but b4's 112/160 and 272/448 stages share a stride, so
the neck takes the deepest feature of each stride), trains an SSD with each of the study's four
necks on digit canvases and prints parameters, mAP@0.5 and MR^-2 side by side, and draws the
predicted boxes of the best of them on a few test canvases.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from examples.detector_neck import train
from examples.detector_neck.data import CANVAS_CLASSES, DigitsCanvas, detection_transforms
from examples.detector_neck.models import NECKS, backbone_levels, build_ssd, efficientnet
from examples.harness.checkpoint import atomic_write

__all__ = ["SEED_LEVELS", "draw_detections", "level_table", "run"]

SEED_LEVELS = [(24, 256, 320), (32, 128, 160), (56, 64, 80), (112, 32, 40), (160, 16, 20),
               (212, 8, 10), (448, 4, 5)]
"""The seed's table of b4's seven stage outputs at 512 x 640 (channels, H, W), as printed there
(its 212 is b4's 272)."""


def level_table(size: tuple[int, int] = (512, 640)) -> None:
    """Print the seed's b4 levels beside the real ones (shapes traced on the meta device)."""
    net = efficientnet("efficientnet_b4").to("meta")
    x = torch.zeros(1, 3, *size, device="meta")
    stages = []
    for block in list(net.features.children())[:-1]:
        x = block(x)
        stages.append(tuple(x.shape[1:]))
    chosen = backbone_levels(efficientnet("efficientnet_b4"))
    print(f"EfficientNet-b4 stage outputs at {size[0]}x{size[1]}: the seed's table vs "
          "torchvision's network")
    print(f"{'stage':>5}  {'seed (C x H x W)':>18}  {'real':>16}  stride  neck input")
    for index, (seed, real) in enumerate(zip(SEED_LEVELS, stages[1:], strict=True), start=1):
        stride = size[0] // real[1]
        name = chosen.get(f"features.{index}", "")
        print(f"{index:>5}  {'x'.join(map(str, seed)):>18}  {'x'.join(map(str, real)):>16}  "
              f"{stride:>6}  {name}")
    print("b4's 112/160 and 272/448 stages share strides 16 and 32; the neck takes the deepest "
          "map of each stride (c3, c4, c5), so the seed's halving of every level does not hold.")


def draw_detections(model: nn.Module, images: list[torch.Tensor], targets: list[dict],
                    path: Path) -> Path:
    """Draw ground-truth (green) boxes and as many of the best-scored predictions (red, with
    class and score) as each image has objects, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    model.eval()
    with torch.no_grad():
        detections = model(images)
    fig, axes = plt.subplots(1, len(images), figsize=(2.6 * len(images), 2.9), squeeze=False)
    for ax, image, target, found in zip(axes[0], images, targets, detections, strict=True):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
        for box in target["boxes"]:
            x1, y1, x2, y2 = box.tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        top = found["scores"].argsort(descending=True)[: len(target["boxes"])]
        for box, label, conf in zip(found["boxes"][top], found["labels"][top],
                                    found["scores"][top], strict=True):
            x1, y1, x2, y2 = box.tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=1))
            ax.text(x1, y1, f"{CANVAS_CLASSES[int(label)]} {conf:.2f}", color="red", fontsize=6)
        ax.set_axis_off()
    fig.suptitle("green: ground truth; red: the best-scored predictions, one per object",
                 fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def run(out: Path, *, epochs: int = 10, limit: int = 256, image_size: int = 64,
        necks: tuple[str, ...] = tuple(NECKS)) -> list[dict]:
    """Train each neck briefly on digit canvases; print the table and write the figure."""
    print(f"Scaled down to fit the demo: digit canvases instead of the study's pedestrian "
          f"images, {image_size}x{image_size} instead of 512x640, efficientnet_tiny (b0's stages "
          f"at half width and depth) instead of b4, {limit} training canvases, {epochs} epochs "
          "from random weights on the CPU; the numbers show the necks train, not their ranking.")
    rows = []
    for neck in necks:
        start = time.perf_counter()
        flags = ["--neck", neck, "--dataset", "digits-canvas", "--backbone",
                 "efficientnet_tiny", "--image-size", str(image_size), "--batch-size", "16",
                 "--lr", "3e-3", "--limit", str(limit), "--epochs", str(epochs), "--device",
                 "cpu", "--out", str(out / "detector" / neck), "--quiet"]
        if train.main(flags) != 0:
            raise RuntimeError(f"training the {neck} detector failed")
        metrics = json.loads((out / "detector" / neck / "metrics.json").read_text())
        model = build_ssd(neck, len(CANVAS_CLASSES), (image_size, image_size),
                          "efficientnet_tiny")
        rows.append({"neck": neck, "parameters": metrics["parameters"],
                     "neck_parameters": sum(p.numel() for p in model.backbone.neck.parameters()),
                     "levels": len(model.anchor_generator.aspect_ratios),
                     "map50": metrics["final"]["best_map50"], "map": metrics["final"]["map"],
                     "mr2": metrics["final"]["mr2"],
                     "seconds": time.perf_counter() - start})
    print(f"{'neck':<16}{'levels':>7}{'neck params':>13}{'all params':>12}{'mAP@0.5':>9}"
          f"{'mAP':>7}{'MR-2':>7}{'seconds':>9}")
    for r in rows:
        print(f"{r['neck']:<16}{r['levels']:>7}{r['neck_parameters']:>13,}{r['parameters']:>12,}"
              f"{r['map50']:>9.3f}{r['map']:>7.3f}{r['mr2']:>7.1%}{r['seconds']:>9.1f}")
    last = max(rows, key=lambda r: r["map50"])["neck"]
    model = build_ssd(last, len(CANVAS_CLASSES), (image_size, image_size), "efficientnet_tiny")
    state = torch.load(out / "detector" / last / "best.pt", weights_only=True)["model_state"]
    model.load_state_dict(state)
    test = DigitsCanvas("val", count=4, transforms=detection_transforms(
        (image_size, image_size), train=False))
    images, targets = zip(*(test[i] for i in range(4)), strict=True)
    print(f"predicted boxes ({last}): "
          f"{draw_detections(model, list(images), list(targets), out / 'detections.png')}")
    return rows
