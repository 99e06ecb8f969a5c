"""EfficientDet's BiFPN from effdet (``effdet.efficientdet.BiFpn``) as a :class:`~dilconv.BiFPN`.

effdet builds its BiFPN for one image size (its resampling layers hold fixed sizes); the
converted neck computes the same function at that size and runs at any other size too.

What converts: the BiFPN graph (``fpn_name`` ``bifpn_fa``, ``bifpn_attn``, ``bifpn_sum`` and
the default), separable convolutions, max-pool down-sampling (``pad_type`` ``""`` or
TensorFlow's ``"same"``), nearest up-sampling, batch norm after every resampling convolution,
any activation, pre-activation or conv-bn-act order, with or without redundant biases. What does
not (``pan_fa``/``qufpn_fa`` graphs, ``separable_conv=False``, bilinear or average resampling,
``apply_resample_bn=False``) is refused with a :class:`ConversionError` naming the setting.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

from torch import nn

from dilconv._layers import ActLayer, Device, DType, NormLayer, create_act
from dilconv.bifpn import BiFPN
from dilconv.convert._common import ConversionError, copy_state, norm_factory, placement

__all__ = ["bifpn_from_effdet", "bifpn_graph"]

_CONVERTER = "BiFPN.from_effdet"
_FUSIONS = {"fastattn": "fast", "attn": "softmax", "sum": "sum"}


def bifpn_graph(num_levels: int) -> list[list[int]]:
    """The inputs of each node of one BiFPN layer over ``num_levels`` levels, as offsets into
    [levels..., nodes...]: the top-down nodes from level L-2 to 0 read (level, the node or level
    above); the bottom-up nodes from level 1 to L-1 read (level, its top-down node if any, the
    node below). This is the graph of EfficientDet's fig. 2f and of effdet's ``bifpn_*``."""
    last = {level: level for level in range(num_levels)}
    every = {level: [level] for level in range(num_levels)}
    nodes: list[list[int]] = []
    for level in reversed(range(num_levels - 1)):
        nodes.append([last[level], last[level + 1]])
        last[level] = num_levels + len(nodes) - 1
        every[level].append(last[level])
    for level in range(1, num_levels):
        nodes.append([*every[level], last[level - 1]])
        last[level] = num_levels + len(nodes) - 1
    return nodes


def _refuse(setting: str, found: str) -> ConversionError:
    return ConversionError(f"{_CONVERTER} cannot express {setting}: {found}")


def _act_factory(act: nn.Module) -> ActLayer:
    """A factory that rebuilds the activation ``act`` with its settings (LeakyReLU's slope)."""
    if type(act) is nn.LeakyReLU:
        return functools.partial(nn.LeakyReLU, negative_slope=act.negative_slope)
    return type(act)


def _same_repr(ours: nn.Module, theirs: nn.Module, where: str) -> None:
    """Refuse unless the two layers print alike (kernel, padding, groups, bias, eps, momentum)."""
    def strip(text: str) -> str:
        return text.replace("inplace=True", "").replace(", )", ")").replace("()", "")

    if strip(repr(ours)) != strip(repr(theirs)):
        raise _refuse(where, f"effdet has {theirs!r} where dilconv builds {ours!r}")


class _Reader:
    """The settings of an effdet ``BiFpn``, read from its modules (effdet keeps no config)."""

    def __init__(self, fpn: Any) -> None:  # effdet's BiFpn, untyped
        from effdet.efficientdet import SeparableConv2d

        self.fpn = fpn
        self.num_levels: int = fpn.num_levels
        self.inputs = self.num_levels - len(fpn.resample)
        self.cells = list(fpn.cell.children())
        if self.inputs < 2 or not self.cells:
            raise _refuse("the pyramid", f"{self.inputs} input levels and {len(self.cells)} "
                          "cells (BiFPN needs at least 2 input levels and 1 cell)")
        graph = bifpn_graph(self.num_levels)
        methods = set()
        for r, cell in enumerate(self.cells):
            offsets = [list(node.combine.inputs_offsets) for node in cell.fnode]
            if offsets != graph:
                raise _refuse("fpn_name", f"cell {r} reads {offsets}; only the BiFPN graph "
                              f"{graph} (bifpn_fa, bifpn_attn, bifpn_sum) converts, not pan_fa "
                              "or qufpn_fa")
            methods |= {node.combine.weight_method for node in cell.fnode}
            for k, node in enumerate(cell.fnode):
                if not isinstance(node.after_combine.conv, SeparableConv2d):
                    raise _refuse("separable_conv=False", f"cell {r} node {k} has "
                                  f"{type(node.after_combine.conv).__name__}")
        if len(methods) != 1 or next(iter(methods)) not in _FUSIONS:
            raise _refuse("weight_method", f"{sorted(methods)} (one of {sorted(_FUSIONS)})")
        self.fusion = _FUSIONS[methods.pop()]
        first = self.cells[0].fnode[0].after_combine
        self.pre_act = "act" in dict(first.named_children())
        separable = first.conv
        self.channels: int = separable.conv_pw.out_channels
        if separable.bn is None:
            raise _refuse("norm_layer=None", "the BiFPN nodes have no norm")
        self.norm_layer: NormLayer = norm_factory(
            separable.bn, converter=_CONVERTER, where="the BiFPN nodes' norm"
        )
        act = first.act if self.pre_act else separable.act
        self.act_layer: ActLayer | None = None if act is None else _act_factory(act)
        self.redundant_bias = separable.conv_pw.bias is not None
        self.padding = self._downsample_padding()
        self._check_resampling()
        self.in_channels = [self._level_channels(level) for level in range(self.inputs)]

    def _resamplers(self) -> list[tuple[str, nn.Module]]:
        found = [(f"resample.{k}", m) for k, m in self.fpn.resample.items()]
        for r, cell in enumerate(self.cells):
            for k, node in enumerate(cell.fnode):
                found += [(f"cell.{r}.fnode.{k}.combine.resample.{o}", m)
                          for o, m in node.combine.resample.items()]
        return found

    def _downsample_padding(self) -> str:
        from timm.layers.pool2d_same import MaxPool2dSame

        paddings = set()
        for name, resample in self._resamplers():
            down = getattr(resample, "downsample", None)
            if down is None:
                continue
            if type(down) is MaxPool2dSame:
                padding, pad = "same", (0, 0)
            elif type(down) is nn.MaxPool2d:
                padding, pad = "symmetric", (1, 1)
            else:
                raise _refuse("downsample_type", f"{name}.downsample is {down!r}; only max-pool "
                              "down-sampling converts")
            size = tuple(down.kernel_size) if isinstance(down.kernel_size, Sequence) else (
                down.kernel_size,) * 2
            stride = tuple(down.stride) if isinstance(down.stride, Sequence) else (
                down.stride,) * 2
            padded = tuple(down.padding) if isinstance(down.padding, Sequence) else (
                down.padding,) * 2
            if size != (3, 3) or stride != (2, 2) or padded != pad or down.ceil_mode:
                raise _refuse("the image size", f"{name}.downsample is {down!r}; only 3x3 "
                              "stride-2 pools between levels of half the size convert (build "
                              "effdet for a size whose levels halve, such as a multiple of 128)")
            paddings.add(padding)
        if len(paddings) > 1:
            raise _refuse("pad_type", f"mixed max-pool paddings {sorted(paddings)}")
        return paddings.pop() if paddings else "symmetric"

    def _check_resampling(self) -> None:
        for name, resample in self._resamplers():
            up = getattr(resample, "upsample", None)
            if up is not None and getattr(up, "mode", "nearest") != "nearest":
                raise _refuse("upsample_type", f"{name}.upsample interpolates {up.mode!r}; "
                              "only 'nearest' converts")
            conv = getattr(resample, "conv", None)
            if conv is None:
                continue
            if conv.bn is None:
                raise _refuse("apply_resample_bn=False", f"{name}.conv has no norm")
            if (conv.conv.bias is not None) != self.redundant_bias:
                raise _refuse("redundant_bias", f"{name}.conv.conv has bias="
                              f"{conv.conv.bias is not None} where the node convolutions have "
                              f"bias={self.redundant_bias}")

    def _level_channels(self, level: int) -> int:
        for node in self.cells[0].fnode:
            if str(level) in node.combine.resample:
                conv = getattr(node.combine.resample[str(level)], "conv", None)
                return self.channels if conv is None else conv.conv.in_channels
        raise _refuse("the pyramid", f"no node of cell 0 reads input level {level}")

    def kwargs(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels, "channels": self.channels,
            "num_layers": len(self.cells), "num_levels": self.num_levels,
            "projection": "per_node", "eps": 1e-4, "fusion": self.fusion,
            "act_layer": self.act_layer, "norm_layer": self.norm_layer,
            "node_order": "act_conv_norm" if self.pre_act else "conv_norm_act",
            "redundant_bias": self.redundant_bias, "downsample_padding": self.padding,
        }


def _map(
    mapping: dict[str, str], ours: nn.Module, prefix: str, pairs: dict[str, str]
) -> None:
    """Map every state_dict key of ``ours`` (under ``prefix``) through the first local prefix
    of ``pairs`` it starts with (``"0."`` -> ``"...conv.conv."``)."""
    for key in ours.state_dict():
        local = next((p for p in pairs if key.startswith(p)), None)
        if local is None:
            raise ConversionError(f"{_CONVERTER}: no effdet tensor for {prefix}{key}")
        mapping[prefix + key] = pairs[local] + key[len(local):]


def bifpn_from_effdet(fpn: nn.Module, *, device: Device = None, dtype: DType = None) -> BiFPN:
    """A :class:`~dilconv.BiFPN` holding the weights of effdet's ``BiFpn`` with its outputs.

    The result uses EfficientDet's per-node projections (``projection="per_node"``) and
    effdet's settings (norm, activation, node order, redundant biases, max-pool padding), in the
    source's train/eval mode, with each parameter's ``requires_grad``, on its device and dtype.
    It takes a list of the backbone levels (C3..C5 for EfficientDet) and returns the
    ``num_levels`` outputs, as ``fpn`` does, at the size effdet was built for and at any other.

    Args:
        fpn: ``effdet.create_model(name, ...).fpn``, an ``effdet.efficientdet.BiFpn``.
        device: where to build the result; by default where ``fpn``'s tensors are.
        dtype: floating dtype of the result; by default that of ``fpn``'s tensors.

    Raises:
        TypeError: ``fpn`` is not effdet's ``BiFpn``.
        ConversionError: ``fpn`` holds what a BiFPN cannot express (the message names the
            effdet setting), or a tensor of ``fpn`` would not be carried over.

    Example:
        >>> import torch
        >>> from effdet import create_model
        >>> from dilconv import BiFPN
        >>> det = create_model("tf_efficientdet_d0", pretrained=False,
        ...                    pretrained_backbone=False, image_size=(128, 128))
        >>> neck = BiFPN.from_effdet(det.fpn).eval()
        >>> levels = [torch.randn(1, c, s, s) for c, s in ((40, 16), (112, 8), (320, 4))]
        >>> with torch.no_grad():
        ...     ours, theirs = neck(levels), det.eval().fpn(list(levels))
        >>> all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
        True
    """
    from effdet.efficientdet import BiFpn

    if not isinstance(fpn, BiFpn):
        raise TypeError(
            f"{_CONVERTER} expects an effdet.efficientdet.BiFpn, got "
            f"{type(fpn).__module__}.{type(fpn).__qualname__}"
        )
    reader = _Reader(fpn)
    device, dtype = placement(fpn, device, dtype, converter=_CONVERTER)
    ours: Any = BiFPN(**reader.kwargs(), device=device, dtype=dtype)  # walked by name below
    mapping: dict[str, str] = {}
    target_only: list[str] = []
    layers: list[tuple[nn.Module, nn.Module, str]] = []
    for j, extra in enumerate(ours.extra):
        theirs = f"resample.{reader.inputs + j}"
        _map(mapping, extra, f"extra.{j}.", {"conv.": f"{theirs}.conv.conv.",
                                             "norm.": f"{theirs}.conv.bn."})
        if extra.conv is not None and extra.norm is not None:
            source = fpn.get_submodule(f"{theirs}.conv")
            layers += [(extra.conv, source.conv, theirs), (extra.norm, source.bn, theirs)]
    levels = reader.num_levels
    for r, layer in enumerate(ours.layers):
        nodes = [(f"top_down.{i}", levels - 2 - i, n) for i, n in enumerate(layer.top_down)]
        nodes += [(f"bottom_up.{i}", levels - 1 + i, n) for i, n in enumerate(layer.bottom_up)]
        for name, k, node in nodes:
            prefix, theirs = f"layers.{r}.{name}.", f"cell.{r}.fnode.{k}."
            fnode = fpn.get_submodule(theirs[:-1])
            pairs = {"depthwise.": f"{theirs}after_combine.conv.conv_dw.",
                     "pointwise.": f"{theirs}after_combine.conv.conv_pw.",
                     "norm.": f"{theirs}after_combine.conv.bn.",
                     "fusion.weight": f"{theirs}combine.edge_weights"}
            sep = fnode.after_combine.conv
            layers += [(node.depthwise, sep.conv_dw, theirs + "conv_dw"),
                       (node.pointwise, sep.conv_pw, theirs + "conv_pw"),
                       (node.norm, sep.bn, theirs + "bn")]
            offsets = fnode.combine.inputs_offsets
            for j, project in enumerate(node.project or ()):
                if isinstance(project, nn.Sequential):
                    source = f"{theirs}combine.resample.{offsets[j]}.conv."
                    pairs[f"project.{j}.0."] = source + "conv."
                    pairs[f"project.{j}.1."] = source + "bn."
                    resample = fpn.get_submodule(source[:-1])
                    layers += [(project[0], resample.conv, source + "conv"),
                               (project[1], resample.bn, source + "bn")]
            _map(mapping, node, prefix, pairs)
            if reader.fusion == "sum":  # ours keeps constant weights as a buffer, effdet none
                del mapping[f"{prefix}fusion.weight"]
                target_only.append(f"{prefix}fusion.weight")
    for ours_layer, theirs_layer, where in layers:
        _same_repr(ours_layer, theirs_layer, where)
    if reader.act_layer is not None:
        first = fpn.cell[0].fnode[0].after_combine
        act = first.act if reader.pre_act else first.conv.act
        _same_repr(create_act(reader.act_layer), act, "act_type")
    copy_state(ours, fpn, mapping, converter=_CONVERTER, target_only=target_only)
    return cast(BiFPN, ours.train(fpn.training))
