"""Converters from other libraries' modules into dilconv blocks, with the same outputs.

Each converter lives in its own module here and imports its source library only when called,
so ``import dilconv`` never imports effdet, timm or torchvision's detection models. The blocks
expose them as class methods (``BiFPN.from_effdet``, ``FPNNeck.from_torchvision``,
``CBAM.from_timm``, ``DilatedResNet.from_torchvision``) that import the converter when called.
All follow one pattern, described in :mod:`dilconv.convert._common`.
"""

from __future__ import annotations

from dilconv.convert._common import ConversionError
from dilconv.convert.effdet import bifpn_from_effdet
from dilconv.convert.timm_cbam import cbam_from_timm
from dilconv.convert.torchvision_fpn import fpn_from_torchvision
from dilconv.convert.torchvision_resnet import resnet_from_torchvision

__all__ = [
    "ConversionError",
    "bifpn_from_effdet",
    "cbam_from_timm",
    "fpn_from_torchvision",
    "resnet_from_torchvision",
]
