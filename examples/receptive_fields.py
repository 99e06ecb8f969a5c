"""Receptive fields of the Dilated-FPN study's backbones and of DilatedNet's context module.

``python -m examples.receptive_fields --out runs/demo`` writes ``receptive_fields.png``: for FPN
and Dilated FPN (seed 000; stage 3 of the backbone, C4) and for the basic context module
(seed 002), the measured field of the centre output pixel as a heat map over the input (the
gradient with every path made positive, log scale) with the analytic field's box drawn on top.
:func:`receptive_field_table` gives the numbers the demo prints: the context module's fields
after each layer, paper (Yu & Koltun, Table 1) vs analytic vs measured, and the stage fields
of FPN vs Dilated FPN.
"""

from __future__ import annotations

import argparse
import time
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from dilconv import ContextModule, gradient_map, receptive_field
from examples.dfpn_classifier.models import MODELS, PAPER_NAMES

__all__ = ["main", "print_table", "receptive_field_table"]

# Yu & Koltun (ICLR 2016), Table 1: receptive field after each layer of the context module.
PAPER_CONTEXT_FIELDS = (3, 5, 9, 17, 33, 65, 67, 67)
IMAGE_SIZE = 256
CONTEXT_SIZE = 80


class Stages(nn.Module):
    """The stem and the first ``depth`` stages of a :class:`~dilconv.DilatedResNet`."""

    def __init__(self, backbone: nn.Module, depth: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        x = self.backbone.forward_stem(x)
        for stage in self.backbone.stages[: self.depth]:
            x = stage(x)
        return x


class ContextPrefix(nn.Module):
    """The first ``depth`` layers of a :class:`~dilconv.ContextModule` (ReLU after 1..7)."""

    def __init__(self, context: ContextModule, depth: int) -> None:
        super().__init__()
        self.context = context
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.context.convs) - 1
        for i, conv in enumerate(self.context.convs[: self.depth]):
            x = conv(x)
            if i < last:
                x = self.context.act(x)
        return x


def _extent(heat: Tensor) -> int:
    """Rows spanned by the non-zero gradient (the measured field's height)."""
    rows = (heat > 0).any(1).nonzero().flatten()
    return int(rows[-1] - rows[0] + 1)


@cache
def _measured(key: str) -> tuple[str, nn.Module, tuple[int, int, int], Tensor]:
    """(title, module, input shape, gradient map) of one panel; computed once per process."""
    torch.manual_seed(0)
    if key == "context":
        title, module = "context module (basic)", ContextModule(2)
        shape = (2, CONTEXT_SIZE, CONTEXT_SIZE)
    else:
        title = f"{PAPER_NAMES[key]}, stage 3 (C4)"
        module, shape = Stages(MODELS[key]().backbone, 3), (3, IMAGE_SIZE, IMAGE_SIZE)
    return title, module, shape, gradient_map(module, shape[1:], in_channels=shape[0])


def receptive_field_table() -> list[dict]:
    """Rows ``{network, layer, paper, analytic, measured}`` (fields as heights in pixels).

    ``analytic`` is :func:`dilconv.receptive_field`; ``measured`` the extent of the non-zero
    gradient of the centre output pixel (:func:`dilconv.gradient_map`). ``paper`` is the
    context module's Table 1 in Yu & Koltun; seed 000 gives no fields, so it is None there.
    """
    rows = []
    _, context, shape, _ = _measured("context")
    for depth, paper in enumerate(PAPER_CONTEXT_FIELDS, start=1):
        prefix = ContextPrefix(context, depth)
        rows.append({
            "network": "context module (basic)",
            "layer": f"{depth} (dilation {context.dilations[depth - 1]})",
            "paper": paper,
            "analytic": receptive_field(prefix, shape[1:], in_channels=shape[0]).size[0],
            "measured": _extent(gradient_map(prefix, shape[1:], in_channels=shape[0])),
        })
    for key in ("fpn", "dfpn"):
        _, stages, shape, heat = _measured(key)
        rows.append({
            "network": PAPER_NAMES[key],
            "layer": "stage 3 (C4)",
            "paper": None,
            "analytic": receptive_field(stages, shape[1:]).size[0],
            "measured": _extent(heat),
        })
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'network':<26}{'layer':<18}{'paper':>7}{'analytic':>10}{'measured':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        paper = "-" if row["paper"] is None else row["paper"]
        print(f"{row['network']:<26}{row['layer']:<18}{paper:>7}{row['analytic']:>10}"
              f"{row['measured']:>10}")


def draw(out: Path) -> Path:
    """Heat maps of the measured fields, with the analytic box; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    keys = ("fpn", "dfpn", "context")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 5))
    for ax, key in zip(axes, keys):
        title, module, shape, heat = _measured(key)
        rf = receptive_field(module, shape[1:], in_channels=shape[0])
        with torch.no_grad():
            size = module.eval()(torch.zeros(1, *shape)).shape[-2:]
        centre = ((size[0] - 1) // 2, (size[1] - 1) // 2)
        (top, bottom), (left, right) = rf.box(centre)
        shown = heat.clamp_min(heat[heat > 0].min()).log10()
        image = ax.imshow(shown.numpy(), cmap="magma")
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1,
                               fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_title(f"{title}\nanalytic {rf.size[0]}x{rf.size[1]}, "
                     f"measured {_extent(heat)}x{_extent(heat.T)}")
        fig.colorbar(image, ax=ax, fraction=0.046, label="log10 |gradient|")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "receptive_fields.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print_table(receptive_field_table())
    print(f"figure: {draw(args.out)} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
