"""The one pattern every converter follows, and the checks it shares.

A converter (1) reads the source module's settings and refuses, naming the setting, whatever the
dilconv block cannot express; (2) builds the block with those settings, on the source's device
and dtype; (3) maps every state_dict key of the block to one key of the source; (4) copies the
tensors with :func:`copy_state`, which checks that every source tensor was used exactly once,
that every key of the block was filled, that shapes agree and that the key counts match; and
(5) keeps each parameter's ``requires_grad`` and the source's train/eval mode.

Where the block's module names differ from the source's, one table of module prefixes, ours ->
theirs (:func:`renamed`), gives the key map (:func:`key_map`), the layers to compare
(:func:`check_same_layers`) and the modes to copy (:func:`keep_modes`).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping

import torch
from torch import nn

from dilconv._layers import Device, DType, NormLayer

__all__ = [
    "ConversionError",
    "check_same_layers",
    "copy_state",
    "keep_modes",
    "key_map",
    "norm_factory",
    "placement",
    "renamed",
]


class ConversionError(ValueError):
    """The source module holds something the dilconv block cannot express, or a tensor of the
    source would be dropped by the conversion."""


def placement(
    model: nn.Module, device: Device, dtype: DType, *, converter: str
) -> tuple[Device, torch.dtype]:
    """``device`` and ``dtype``, each defaulting to the one all of ``model``'s tensors share."""
    tensors = [*model.parameters(), *model.buffers()]
    if device is None:
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise ValueError(
                f"{converter}: the source's tensors are on {sorted(map(str, devices))}; "
                "pass device= to choose one"
            )
        device = devices.pop() if devices else torch.device("cpu")
    if dtype is None:
        dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        if len(dtypes) > 1:
            raise ValueError(
                f"{converter}: the source's tensors have dtypes {sorted(map(str, dtypes))}; "
                "pass dtype= to choose one"
            )
        dtype = dtypes.pop() if dtypes else torch.get_default_dtype()
    return device, dtype


def copy_state(
    target: nn.Module,
    source: nn.Module,
    mapping: Mapping[str, str],
    *,
    converter: str,
    target_only: Collection[str] = (),
) -> None:
    """Copy ``source``'s tensors into ``target``, key ``theirs`` into key ``ours`` for every
    ``ours -> theirs`` of ``mapping``, and keep each parameter's ``requires_grad``.

    ``target_only`` names keys of ``target`` that the source has no tensor for and that keep the
    value the block was built with (for instance the constant weights of a ``"sum"`` fusion).

    Raises:
        ConversionError: a source tensor is not used, or used twice; a key of ``target`` is
            neither mapped nor in ``target_only``; a mapped key does not exist on either side;
            two mapped tensors differ in shape.
    """
    theirs = source.state_dict(keep_vars=True)
    ours = target.state_dict(keep_vars=True)
    unknown_ours = sorted(set(mapping) - set(ours))
    unknown_theirs = sorted(set(mapping.values()) - set(theirs))
    if unknown_ours or unknown_theirs:
        raise ConversionError(
            f"{converter}: the key map names keys that do not exist: ours {unknown_ours}, "
            f"theirs {unknown_theirs}"
        )
    used = list(mapping.values())
    twice = sorted({key for key in used if used.count(key) > 1})
    unused = sorted(set(theirs) - set(used))
    unfilled = sorted(set(ours) - set(mapping) - set(target_only))
    if twice or unused or unfilled:
        raise ConversionError(
            f"{converter}: the conversion would not carry every tensor over: source tensors "
            f"unused {unused}, used twice {twice}; dilconv tensors left unfilled {unfilled}"
        )
    if len(mapping) + len(target_only) != len(ours) or len(mapping) != len(theirs):
        raise ConversionError(
            f"{converter}: key counts differ: {len(theirs)} source tensors, {len(ours)} dilconv "
            f"tensors ({len(target_only)} of them dilconv's own)"
        )
    with torch.no_grad():
        for key, source_key in mapping.items():
            src, dst = theirs[source_key], ours[key]
            if src.shape != dst.shape:
                raise ConversionError(
                    f"{converter}: {source_key} has shape {tuple(src.shape)}, the dilconv "
                    f"tensor {key} it goes to has {tuple(dst.shape)}"
                )
            dst.copy_(src)
            if isinstance(dst, nn.Parameter) and isinstance(src, nn.Parameter):
                dst.requires_grad_(src.requires_grad)


def renamed(name: str, prefixes: Mapping[str, str]) -> str:
    """``name`` (a module or state-dict key of ours) with its longest dotted prefix that is a key
    of ``prefixes`` replaced by the source's name for it; unchanged when none is.

    >>> renamed("lateral.0.weight", {"lateral.0": "inner_blocks.0.0", "lateral": "inner_blocks"})
    'inner_blocks.0.0.weight'
    """
    parts = name.split(".") if name else []
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in prefixes:
            return ".".join(filter(None, [prefixes[prefix], *parts[end:]]))
    return name


def key_map(target: nn.Module, prefixes: Mapping[str, str]) -> dict[str, str]:
    """Every state-dict key of ``target``, mapped to the source's key by :func:`renamed`."""
    return {key: renamed(key, prefixes) for key in target.state_dict(keep_vars=True)}


def _get(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def check_same_layers(
    target: nn.Module,
    source: nn.Module,
    prefixes: Mapping[str, str],
    *,
    converter: str,
    built: str,
    skip: Collection[str] = (),
) -> None:
    """Raise unless every layer (leaf module) of ``target`` prints as the source's layer it maps
    to: same type and settings (a convolution's padding and bias, a norm's eps). An
    ``nn.Identity`` of ours may stand for a layer the source does not have; ``skip`` names
    modules of ours the converter has checked itself. ``built`` says what ``target`` is in the
    message (``"the FPNNeck of its settings"``).
    """
    for name, ours in target.named_modules():
        if next(ours.children(), None) is not None or name in skip:
            continue
        theirs_name = renamed(name, prefixes)
        theirs = _get(source, theirs_name)
        if theirs is None and isinstance(ours, nn.Identity):
            continue
        if repr(theirs) != repr(ours):
            raise ConversionError(
                f"{converter} cannot express {theirs_name}: the source has {theirs!r} where "
                f"{built} has {ours!r}"
            )


def keep_modes(target: nn.Module, source: nn.Module, prefixes: Mapping[str, str]) -> None:
    """Give each module of ``target`` the train/eval mode of the source module it maps to, or,
    where the source has none of that name, of the nearest one above it that it has."""
    for name, ours in target.named_modules():
        theirs_name = renamed(name, prefixes)
        theirs = _get(source, theirs_name)
        while theirs is None:
            theirs_name = theirs_name.rpartition(".")[0]
            theirs = _get(source, theirs_name)
        ours.training = theirs.training


def norm_factory(norm: nn.Module, *, converter: str, where: str) -> NormLayer:
    """A factory that builds ``norm``'s type with ``norm``'s settings for any channel count.

    Keeps ``BatchNorm2d`` (eps, momentum, affine, running statistics), torchvision's
    ``FrozenBatchNorm2d`` (eps) and ``GroupNorm`` (groups, eps, affine); refuses any other
    type, naming ``where`` the norm was found.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    if type(norm) is FrozenBatchNorm2d:
        return functools.partial(FrozenBatchNorm2d, eps=norm.eps)
    if type(norm) is nn.BatchNorm2d:
        return functools.partial(
            nn.BatchNorm2d, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
            track_running_stats=norm.track_running_stats,
        )
    if type(norm) is nn.GroupNorm:
        return functools.partial(nn.GroupNorm, norm.num_groups, eps=norm.eps, affine=norm.affine)
    raise TypeError(
        f"{converter} keeps BatchNorm2d, FrozenBatchNorm2d and GroupNorm norms, "
        f"{where} is {type(norm).__name__}"
    )
