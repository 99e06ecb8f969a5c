"""
The effective receptive field
=============================

Luo et al. (NeurIPS 2016) observed that, with real weights, the gradient of an output pixel
with respect to the input is roughly Gaussian and fills only a small part of the theoretical
field. :func:`dilconv.gradient_map` with ``weights="real"`` averages ``|dy/dx|`` over random
inputs; :func:`dilconv.effective_receptive_field` gives the radius that holds 95 % of that mass
(drawn as a circle) beside the analytic box of :func:`dilconv.receptive_field` (the square).

Two stacks of eight 3x3 convolutions with ReLUs, randomly initialised (PyTorch's default),
and the same stack with the context module's dilations (Yu & Koltun's Table 1: 1, 1, 2, 4, 8,
16, 1, 1): dilation widens the theoretical field from 17 to 69 pixels and the effective field
with it; in both, the mass is densest near the centre and thins out towards the box's edges.
"""

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import Circle, Rectangle
from torch import nn

from dilconv import effective_receptive_field, gradient_map, receptive_field

SIZE = 81
SAMPLES = 4


def stack(dilations: tuple[int, ...], channels: int = 8) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=dilations[0],
                                         dilation=dilations[0]), nn.ReLU()]
    for d in dilations[1:]:
        layers += [nn.Conv2d(channels, channels, 3, padding=d, dilation=d), nn.ReLU()]
    return nn.Sequential(*layers)


torch.manual_seed(0)
networks = {
    "plain 3x3, eight layers": stack((1,) * 8),
    "dilations 1, 1, 2, 4, 8, 16, 1, 1": stack((1, 1, 2, 4, 8, 16, 1, 1)),
}

fig, axes = plt.subplots(1, len(networks), figsize=(10, 5.2), layout="constrained")
for ax, (title, net) in zip(axes, networks.items()):
    heat = gradient_map(net, (SIZE, SIZE), weights="real", samples=SAMPLES)
    radius = effective_receptive_field(net, (SIZE, SIZE), share=0.95, samples=SAMPLES)
    rf = receptive_field(net, (SIZE, SIZE))
    centre = (SIZE - 1) // 2
    (y0, y1), (x0, x1) = rf.box((centre, centre))
    ax.imshow(heat.numpy(), cmap="magma")
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False,
                           edgecolor="cyan", linewidth=1.5))
    ax.add_patch(Circle((centre, centre), radius, fill=False, edgecolor="lime", linewidth=1.5))
    ax.set_title(f"{title}\ntheoretical {rf.size[0]}x{rf.size[1]} (cyan), "
                 f"95 % of the mass within r = {radius:.1f} (green)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %%
# The radius for a few shares of the mass, for the dilated stack (half its box is 34 px).
net = networks["dilations 1, 1, 2, 4, 8, 16, 1, 1"]
for share in (0.5, 0.9, 0.95, 0.99):
    print(f"{share:.0%} of the gradient mass within r = "
          f"{effective_receptive_field(net, (SIZE, SIZE), share=share, samples=SAMPLES):.1f} px")
