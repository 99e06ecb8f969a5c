"""The one layer-injection convention of every dilconv block (``act_layer``, ``norm_layer``).

Every block that takes an ``act_layer`` builds it with :func:`create_act` and every block that
takes a ``norm_layer`` builds it with :func:`create_norm`, so that any activation class and any
norm layer is accepted the same way everywhere:

- ``act_layer``: a class or factory (``nn.ReLU``, ``nn.GELU``, ``nn.SiLU``,
  ``functools.partial(nn.LeakyReLU, negative_slope=0.2)``, ...). It is called with
  ``inplace=True`` when its signature has an ``inplace`` parameter that a ``partial`` has not
  already fixed, and with no arguments otherwise (``nn.GELU``, ``nn.Tanh``, a custom class).
  ``None`` means no activation (``nn.Identity``).
- ``norm_layer``: a class or factory called as ``norm_layer(num_features)``, with
  ``device=``/``dtype=`` when it accepts them (``nn.BatchNorm2d``,
  ``partial(nn.GroupNorm, 8)``) and moved there afterwards when it does not (torchvision's
  ``FrozenBatchNorm2d``). ``None`` means no norm (``nn.Identity``); a convolution that had no
  bias because a norm followed it then gets one (:func:`conv_bias`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TypedDict

import torch
from torch import nn

__all__ = [
    "ActLayer",
    "DType",
    "Device",
    "FactoryKwargs",
    "NormLayer",
    "autocast_enabled",
    "conv_bias",
    "create_act",
    "create_norm",
]

ActLayer = Callable[..., nn.Module]
NormLayer = Callable[..., nn.Module]
# The factory keyword arguments every block takes and passes on (as torch.nn layers do).
Device = torch.device | str | int | None
DType = torch.dtype | None


class FactoryKwargs(TypedDict):
    """``dd = {"device": device, "dtype": dtype}``, passed on as ``**dd`` to every layer."""

    device: Device
    dtype: DType


def _parameters(factory: Callable[..., object]) -> dict[str, inspect.Parameter] | None:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return None


def _takes(params: dict[str, inspect.Parameter] | None, name: str) -> bool:
    if params is None:
        return False
    if name in params:
        return params[name].kind is not inspect.Parameter.POSITIONAL_ONLY
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_factory(name: str, value: object, expected: str) -> None:
    # A module instance is callable too, but calling it would run it on the channel count.
    if isinstance(value, nn.Module):
        raise TypeError(
            f"{name} must be {expected} or None, got the instance {value!r}; pass its class "
            f"({type(value).__name__}) or a functools.partial of it"
        )
    if not callable(value):
        raise TypeError(f"{name} must be {expected} or None, got {value!r}")


def create_act(act_layer: ActLayer | None) -> nn.Module:
    """Build one activation module from ``act_layer`` (see the module docstring)."""
    if act_layer is None:
        return nn.Identity()
    _check_factory("act_layer", act_layer, "an activation class or factory (e.g. nn.ReLU)")
    fixed = act_layer.keywords if isinstance(act_layer, functools.partial) else {}
    params = _parameters(act_layer)
    if params is not None and "inplace" in params and "inplace" not in fixed:
        return act_layer(inplace=True)
    return act_layer()


def create_norm(
    norm_layer: NormLayer | None, num_features: int, *, device: Device = None, dtype: DType = None
) -> nn.Module:
    """Build one norm over ``num_features`` channels from ``norm_layer`` (see the module doc)."""
    if norm_layer is None:
        return nn.Identity()
    _check_factory("norm_layer", norm_layer, "a norm class or factory (e.g. nn.BatchNorm2d)")
    if device is None and dtype is None:
        return norm_layer(num_features)
    params = _parameters(norm_layer)
    if _takes(params, "device") and _takes(params, "dtype"):
        return norm_layer(num_features, device=device, dtype=dtype)
    return norm_layer(num_features).to(device=device, dtype=dtype)


def conv_bias(norm_layer: NormLayer | None) -> bool:
    """Whether a convolution followed by ``norm_layer`` needs its own bias (only without a norm)."""
    return norm_layer is None


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch < 2.4 asks per device by name)."""
    if device_type not in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla"):
        return False  # "meta" and others have no autocast (asking raises)
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
