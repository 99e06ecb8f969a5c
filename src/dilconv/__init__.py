"""dilconv: blocks for multi-scale, dilated convolutional networks in PyTorch."""

from __future__ import annotations

# [fusion-bifpn imports]
from dilconv.attention import CBAM, ChannelAttention, SpatialAttention
from dilconv.bifpn import BiFPN, BiFPNLayer
from dilconv.bottleneck import DilatedBasicBlock, DilatedBottleneck

# [attention-resizer imports]
from dilconv.context import ContextModule, identity_init_
from dilconv.effective_field import (
    effective_receptive_field,
    empirical_receptive_field,
    gradient_map,
    gridding_holes,
)
from dilconv.fpn import FPNNeck
from dilconv.fusion import WeightedFusion
from dilconv.receptive_field import ReceptiveField, layer_receptive_fields, receptive_field
from dilconv.resizer import LearnableResizer
from dilconv.resnet import DilatedResNet
from dilconv.upsample import TransposedConvUpsampler

# [context imports]
# [receptive-field imports]

__version__ = "0.1.0"

__all__ = [
    "DilatedBasicBlock",
    "DilatedBottleneck",
    "DilatedResNet",
    "FPNNeck",
    "TransposedConvUpsampler",
    "BiFPN",
    "BiFPNLayer",
    "WeightedFusion",
    # [fusion-bifpn names]
    "CBAM",
    "ChannelAttention",
    "LearnableResizer",
    "SpatialAttention",
    # [attention-resizer names]
    "ContextModule",
    "identity_init_",
    # [context names]
    "ReceptiveField",
    "effective_receptive_field",
    "empirical_receptive_field",
    "gradient_map",
    "gridding_holes",
    "layer_receptive_fields",
    "receptive_field",
    # [receptive-field names]
]
