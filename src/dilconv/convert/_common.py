"""The one pattern every converter follows, and the checks it shares.

A converter (1) reads the source module's settings and refuses, naming the setting, whatever the
dilconv block cannot express; (2) builds the block with those settings, on the source's device
and dtype; (3) maps every state_dict key of the block to one key of the source; (4) copies the
tensors with :func:`copy_state`, which checks that every source tensor was used exactly once,
that every key of the block was filled, that shapes agree and that the key counts match; and
(5) keeps each parameter's ``requires_grad`` and the source's train/eval mode.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import nn

from dilconv._layers import Device, DType

__all__ = ["ConversionError", "copy_state", "placement"]


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
