"""DilatedNet: a dilated VGG16 front-end and a context module (seed 002 of the studies).

Yu & Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions", ICLR 2016:
:mod:`~examples.dilatednet.models` builds the network (and converts torchvision's VGG16 into
its front-end), :mod:`~examples.dilatednet.data` gives segmentation data (image folders, VOC and
an offline digits canvas), :mod:`~examples.dilatednet.train` trains it in the paper's two stages
on the shared harness, :mod:`~examples.dilatednet.demo` is its part of ``make demo``.
"""

__all__: list[str] = []
