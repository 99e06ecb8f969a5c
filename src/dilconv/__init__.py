"""dilconv: blocks for multi-scale, dilated convolutional networks in PyTorch."""

from __future__ import annotations

from dilconv.analytic_field import ReceptiveField, layer_receptive_fields, receptive_field
from dilconv.attention import CBAM, ChannelAttention, SpatialAttention
from dilconv.bifpn import BiFPN, BiFPNLayer
from dilconv.bottleneck import DilatedBasicBlock, DilatedBottleneck
from dilconv.context import ContextModule, identity_init_
from dilconv.effective_field import (
    effective_receptive_field,
    empirical_receptive_field,
    gradient_map,
    gridding_holes,
)
from dilconv.extra_levels import ExtraLevels, MaxPoolLevel, P6P7Levels
from dilconv.fpn import FPNNeck
from dilconv.fusion import WeightedFusion
from dilconv.resizer import LearnableResizer
from dilconv.resnet import DilatedResNet
from dilconv.upsample import TransposedConvUpsampler

__version__ = "0.1.0"

__all__ = [
    # backbones and their blocks
    "DilatedBasicBlock",
    "DilatedBottleneck",
    "DilatedResNet",
    # necks, fusion and up-sampling
    "BiFPN",
    "BiFPNLayer",
    "ExtraLevels",
    "FPNNeck",
    "MaxPoolLevel",
    "P6P7Levels",
    "TransposedConvUpsampler",
    "WeightedFusion",
    # attention and resizing
    "CBAM",
    "ChannelAttention",
    "LearnableResizer",
    "SpatialAttention",
    # context aggregation
    "ContextModule",
    "identity_init_",
    # receptive fields: analytic (analytic_field) and measured (effective_field)
    "ReceptiveField",
    "layer_receptive_fields",
    "receptive_field",
    "effective_receptive_field",
    "empirical_receptive_field",
    "gradient_map",
    "gridding_holes",
]
