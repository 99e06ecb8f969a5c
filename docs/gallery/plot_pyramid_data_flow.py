"""
FPN and BiFPN: how the levels flow
==================================

Both diagrams are drawn from real modules: the levels, their shapes (from a forward pass on a
256x320 image's pyramid at strides 4 to 32) and, for the BiFPN, the fusion weights each node
applies (:meth:`dilconv.WeightedFusion.fusion_weights`; at initialisation every input of a
node counts the same, training moves them).

- :class:`dilconv.FPNNeck` (Lin et al. 2017): a 1x1 lateral convolution per level, a
  top-down path that up-samples the coarser merged map to the finer one's exact size and adds
  it, and a 3x3 smoothing convolution per output.
- :class:`dilconv.BiFPN` (Tan et al., EfficientDet): with ``num_levels=5`` it makes P6 and P7
  from the coarsest input, then each layer runs a top-down pass and a bottom-up pass; every
  node is a weighted fusion followed by a depthwise-separable 3x3 convolution.
"""

import matplotlib.pyplot as plt
import torch
from matplotlib.axes import Axes

from dilconv import BiFPN, FPNNeck

torch.manual_seed(0)
channels = {"c2": 64, "c3": 128, "c4": 256, "c5": 512}
features = {k: torch.randn(1, c, 64 // 2**i, 80 // 2**i) for i, (k, c) in
            enumerate(channels.items())}


def node(ax: Axes, xy: tuple[float, float], text: str, colour: str) -> None:
    ax.text(*xy, text, ha="center", va="center", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": colour, "edgecolor": "0.3"})


def arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], label: str = "",
          colour: str = "0.3", bend: float = 0.0) -> None:
    """An arrow with its label; ``bend`` curves it below the straight line (arc3's rad)."""
    ax.annotate("", end, start, arrowprops={"arrowstyle": "->", "color": colour,
                                            "shrinkA": 18, "shrinkB": 18,
                                            "connectionstyle": f"arc3,rad={bend}"})
    if label:
        t = 0.75 if bend else 0.6
        x = (1 - t) * start[0] + t * end[0]
        y = (1 - t) * start[1] + t * end[1] + 2 * bend
        ax.text(x, y, label, fontsize=7, color=colour, ha="center", va="center",
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})


def shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape[1:]))


fpn = FPNNeck(channels, out_channels=128).eval()
with torch.no_grad():
    pyramid = fpn(features)

fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
for level, (key, x) in enumerate(features.items()):
    y = level
    node(ax, (0, y), f"{key}\n{shape(x)}", "lightyellow")
    if level < len(features) - 1:
        node(ax, (1.2, y), "+", "white")
    node(ax, (2.4, y), f"{key}\n{shape(pyramid[key])}", "lightblue")
    arrow(ax, (0, y), (1.2, y), "lateral 1x1")
    arrow(ax, (1.2, y), (2.4, y), "smooth 3x3")
    if level > 0:
        finer = features[list(features)[level - 1]]
        arrow(ax, (1.2, y), (1.2, y - 1), f"up to {finer.shape[-2]}x{finer.shape[-1]}",
              colour="tab:red")
ax.set_xlim(-0.6, 3.0)
ax.set_ylim(len(features) - 0.4, -0.6)
ax.set_axis_off()
ax.set_title("FPNNeck({'c2': 64, 'c3': 128, 'c4': 256, 'c5': 512}, out_channels=128)\n"
             "inputs (yellow), top-down sums, outputs (blue); fine levels at the top", fontsize=9)
plt.show()

# %%
# The BiFPN
# ---------
# Three inputs (C3 to C5, as EfficientDet takes them), ``num_levels=5``: P6 and P7 are made
# from C5 by a 1x1 convolution and stride-2 max-pools. One layer is drawn; ``num_layers``
# repeats it. Each arrow into a node carries the weight that node gives it.
bifpn = BiFPN({"c3": 128, "c4": 256, "c5": 512}, out_channels=64, num_layers=1, num_levels=5).eval()
inputs = {k: features[k] for k in ("c3", "c4", "c5")}
with torch.no_grad():
    outputs = bifpn(inputs)
layer = bifpn.layers[0]
levels = list(outputs)
n = len(levels)
X_IN, X_TD, X_OUT = 0.0, 1.3, 2.6


def weights(fusion) -> list[str]:
    return [f"{w:.2f}" for w in fusion.fusion_weights().tolist()]


fig, ax = plt.subplots(figsize=(7.5, 5.5), layout="constrained")
for i, key in enumerate(levels):
    if key in inputs:
        node(ax, (X_IN, i), f"{key}\n{shape(inputs[key])}", "lightyellow")
    else:
        node(ax, (X_IN, i), f"{key}\nmade from c5", "mistyrose")
    node(ax, (X_OUT, i), f"out {key}\n{shape(outputs[key])}", "lightblue")
for i in range(n - 1):
    w = weights(layer.top_down[i].fusion)
    node(ax, (X_TD, i), f"td {levels[i]}", "honeydew")
    arrow(ax, (X_IN, i), (X_TD, i), w[0])
    source = (X_TD, i + 1) if i + 1 < n - 1 else (X_IN, i + 1)
    arrow(ax, source, (X_TD, i), f"up {w[1]}", colour="tab:red")
for i in range(1, n):
    w = weights(layer.bottom_up[i - 1].fusion)
    arrow(ax, (X_IN, i), (X_OUT, i), w[0], colour="0.6", bend=0.12 if i < n - 1 else 0.0)
    if i < n - 1:
        arrow(ax, (X_TD, i), (X_OUT, i), w[1])
    arrow(ax, (X_OUT, i - 1), (X_OUT, i), f"down {w[-1]}", colour="tab:blue")
arrow(ax, (X_TD, 0), (X_OUT, 0))
ax.set_xlim(-0.6, 3.2)
ax.set_ylim(n - 0.4, -0.6)
ax.set_axis_off()
ax.set_title("BiFPN({'c3': 128, 'c4': 256, 'c5': 512}, out_channels=64, num_levels=5), one layer\n"
             "top-down (red) then bottom-up (blue); numbers: each node's fusion weights",
             fontsize=9)
plt.show()

print(bifpn.layers[0].top_down[0].fusion)
print({k: tuple(v.shape) for k, v in outputs.items()})
