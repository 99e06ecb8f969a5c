"""
Receptive fields and gridding
=============================

Three stacks of 3x3 convolutions, one input channel each: dilations (1, 1, 1), (2, 2, 2) and
(1, 2, 5). For the centre output pixel, :func:`dilconv.gradient_map` draws which input pixels
reach it (every path counted, so the map is the exact support of the field) and
:func:`dilconv.receptive_field` gives the analytic box, drawn in cyan. Dilations that share a
factor (2, 2, 2) reach a larger box than plain convolutions but only every other pixel in it:
:func:`dilconv.gridding_holes` marks the holes. Hybrid rates (1, 2, 5) cover their whole box.
"""

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Rectangle
from torch import nn

from dilconv import gradient_map, gridding_holes, receptive_field

torch.manual_seed(0)
SIZE = 33
stacks = {
    dilations: nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=d, dilation=d) for d in dilations))
    for dilations in [(1, 1, 1), (2, 2, 2), (1, 2, 5)]
}

fig, axes = plt.subplots(2, len(stacks), figsize=(10, 6.8), layout="constrained")
for (dilations, stack), top, bottom in zip(stacks.items(), axes[0], axes[1]):
    heat = gradient_map(stack, (SIZE, SIZE))
    rf = receptive_field(stack, (SIZE, SIZE))
    (y0, y1), (x0, x1) = rf.box(((SIZE - 1) // 2, (SIZE - 1) // 2))
    holes = gridding_holes(stack, (SIZE, SIZE))
    top.imshow(heat.numpy(), cmap="magma")
    top.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                            edgecolor="cyan", linewidth=1.5))
    top.set_title(f"dilations {dilations}\nanalytic field {rf.size[0]}x{rf.size[1]}")
    bottom.imshow(holes.numpy(), cmap="gray_r", vmin=0, vmax=1)
    bottom.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                               edgecolor="tab:red", linewidth=1.5))
    bottom.set_title(f"{int(holes.sum())} holes in the box")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("|gradient| of the centre output\n(every path positive)")
axes[1, 0].set_ylabel("gridding holes (black)")
plt.show()

# %%
# The same tools on whole networks
# --------------------------------
# Seed 000's Dilated FPN dilates stage 3 of its backbone; seed 002's context module stacks
# dilations 1, 1, 2, 4, 8, 16, 1. ``examples/receptive_fields.py`` measures both (the log of
# the gradient, so the faint edges of the field show) and draws the analytic box on top: the
# two agree to the pixel.
from examples import receptive_fields  # noqa: E402

for row in receptive_fields.receptive_field_table():
    print(f"{row['network']:<24} {row['layer']:<16} paper {row['paper'] or '-':>3}  "
          f"analytic {row['analytic']:>3}  measured {row['measured']:>3}")

# %%
# ``draw`` writes the figure as a PNG; here it is shown inline.
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    image = plt.imread(receptive_fields.draw(Path(tmp)))
fig, ax = plt.subplots(figsize=(12, 4), layout="constrained")
ax.imshow(image)
ax.set_axis_off()
plt.show()
