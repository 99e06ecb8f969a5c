"""What the tests against a peer's own modules share: state moved away from its start."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomise_state"]


def randomise_state(model: nn.Module, std: float = 0.5) -> nn.Module:
    """Every floating tensor of ``model``'s state (weights, biases, norm statistics) drawn
    away from its start, running variances in [0.5, 2], so that any mix-up in a conversion
    shows in the outputs."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif tensor.is_floating_point():
                tensor.normal_(0.0, std)
    return model
