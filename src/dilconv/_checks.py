"""Argument and input validation shared by every dilconv block.

Every block validates its constructor arguments with :func:`check_positive` /
:func:`check_choice` and its inputs with one :func:`check_feature_map` or
:func:`check_levels` call at the top of ``forward``, so that a bad input fails with a
message naming what was expected before any arithmetic runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_feature_map",
    "check_levels",
    "check_positive",
    "pyramid_channels",
    "pyramid_output_keys",
    "check_same_shape",
    "pair",
    "reduced_channels",
]


def check_positive(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; raise naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value  # type: ignore[return-value]  # a SymInt stands for an int, as in torch's sizes


def reduced_channels(channels: int, reduction: int) -> int:
    """Hidden width of a bottleneck MLP (CBAM, squeeze-excite): ``max(1, channels // reduction)``.

    Rounds down (floor division) and never returns less than 1, so ``channels < reduction``
    still keeps one hidden unit; this is the rounding of Woo et al.'s CBAM code. Both
    arguments must be ints >= 1.

    >>> reduced_channels(64, 16), reduced_channels(50, 16), reduced_channels(8, 16)
    (4, 3, 1)
    """
    check_positive("channels", channels)
    check_positive("reduction", reduction)
    return max(1, channels // reduction)


def check_choice(name: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; raise naming ``name`` otherwise."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """Turn an int or a pair of positive ints into a ``(h, w)`` tuple.

    Symbolic sizes (``torch.SymInt``, what ``x.shape`` holds under ``torch.compile(dynamic=True)``
    and ``torch.export``) count as ints, so a size taken from another tensor stays symbolic.
    """
    values = tuple(value) if isinstance(value, Sequence) else (value, value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    for v in values:
        check_positive(name, v)
    return values[0], values[1]


def check_feature_map(x: Tensor, *, channels: int | None = None, name: str = "block") -> None:
    """Raise unless ``x`` is a floating NCHW tensor with ``channels`` channels and H, W >= 1.

    An empty batch (N = 0, what detection heads produce for images without proposals) passes,
    as it does through torchvision's blocks.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expected a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} expected {channels} input channels, got {x.shape[1]} "
            f"(input shape {tuple(x.shape)})"
        )
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(
            f"{name} expected a non-empty spatial size (H, W >= 1), got shape {tuple(x.shape)}"
        )
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} expected a floating-point input, got {x.dtype}")


def check_same_shape(
    tensors: Sequence[Tensor], *, count: int | None = None, name: str = "block"
) -> None:
    """Raise unless ``tensors`` is a sequence of ``count`` floating-point tensors of one shape."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(
            f"{name} expected a sequence of Tensors, got {type(tensors).__name__}"
        )
    if count is not None and len(tensors) != count:
        raise ValueError(f"{name} expected {count} inputs, got {len(tensors)}")
    for i, x in enumerate(tensors):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} expected input {i} to be a Tensor, got {type(x).__name__}")
        if not torch.is_floating_point(x):
            raise TypeError(f"{name} expected floating-point inputs, got {x.dtype} at input {i}")
    # Compared pairwise, not through a set: symbolic sizes (torch.compile, torch.export) are
    # not hashable.
    shapes = [tuple(x.shape) for x in tensors]
    if any(shape != shapes[0] for shape in shapes[1:]):
        raise ValueError(f"{name} expected inputs of one shape, got shapes {shapes}")


def check_levels(
    features: Sequence[Tensor] | Mapping[str, Tensor],
    channels: Sequence[int],
    *,
    name: str,
    keys: Sequence[str] | None = None,
) -> tuple[list[str] | None, list[Tensor]]:
    """Validate a pyramid given as a sequence (fine to coarse) or a mapping name -> map.

    Returns ``(keys, maps)``: ``keys`` is None for a sequence, the mapping's keys in order
    otherwise, so that the caller can hand back the same kind of container.
    """
    if isinstance(features, Tensor):
        raise TypeError(
            f"{name} expected a sequence or mapping of {len(channels)} feature maps, got one Tensor"
        )
    if isinstance(features, Mapping):
        got_keys = list(features.keys())
        if keys is not None and list(keys) != got_keys:
            raise ValueError(f"{name} expected feature keys {list(keys)}, got {got_keys}")
        maps = list(features.values())
    else:
        got_keys = None
        maps = list(features)
    if len(maps) != len(channels):
        raise ValueError(
            f"{name} expected {len(channels)} feature maps (one per in_channels entry), "
            f"got {len(maps)}"
        )
    for i, (x, c) in enumerate(zip(maps, channels)):
        label = f"{name} level {got_keys[i] if got_keys else i}"
        check_feature_map(x, channels=c, name=label)
    # int() here would pin a symbolic batch size to its example value under torch.export.
    if any(x.shape[0] != maps[0].shape[0] for x in maps[1:]):
        batch = sorted({int(x.shape[0]) for x in maps})
        raise ValueError(f"{name} expected one batch size across levels, got {batch}")
    return got_keys, maps


EXTRA_LEVEL_KEY = "pool"


def pyramid_channels(
    in_channels: Sequence[int] | Mapping[str, int], *, min_levels: int = 1
) -> tuple[list[str] | None, list[int]]:
    """Validate a neck's ``in_channels``: a sequence of ints, or a mapping name -> int.

    A mapping (for instance ``{"layer1": 256, ...}``, or timm's ``feature_info`` turned into a
    dict) fixes the feature names the neck accepts. Returns ``(keys or None, channels)``.
    """
    if isinstance(in_channels, Mapping):
        keys: list[str] | None = [str(k) for k in in_channels]
        channels = list(in_channels.values())
    elif isinstance(in_channels, (int, str)) or not isinstance(in_channels, Sequence):
        raise TypeError(
            "in_channels must be a sequence of ints (one per level, fine to coarse) or a "
            f"mapping name -> int, got {type(in_channels).__name__}"
        )
    else:
        keys, channels = None, list(in_channels)
    if len(channels) < min_levels:
        levels = "level" if min_levels == 1 else "levels"
        raise ValueError(f"in_channels must list at least {min_levels} {levels}, got {channels}")
    for c in channels:
        check_positive("in_channels", c)
    return keys, channels


def pyramid_output_keys(
    keys: list[str] | None, extra: bool | Sequence[str], *, name: str
) -> list[str] | None:
    """The keys a neck returns for input ``keys``: the same, plus those of its extra levels.

    ``extra`` names the extra levels; ``True`` stands for the one ``"pool"`` level of
    ``extra_level=True``, ``False`` for none.
    """
    if isinstance(extra, bool):
        extra = [EXTRA_LEVEL_KEY] if extra else []
    if keys is None or not extra:
        return keys
    clash = [key for key in extra if key in keys]
    if clash:
        raise ValueError(
            f"{name} adds the key{'s' if len(clash) > 1 else ''} "
            f"{', '.join(map(repr, clash))} for its extra levels {list(extra)}, which the "
            f"input already has (keys {keys})"
        )
    return [*keys, *extra]
