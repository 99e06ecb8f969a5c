"""Argument and input validation shared by every dilconv block.

Every block validates its constructor arguments with :func:`check_positive` /
:func:`check_choice` and its inputs with one :func:`check_feature_map` or
:func:`check_levels` call at the top of ``forward``, so that a bad input fails with a
message naming what was expected before any arithmetic runs.

Tracers pass stand-ins whose values are unknown: ``torch.fx`` passes ``Proxy`` objects for
tensors and sizes, ``torch.jit.trace`` records sizes as tensors. The input checks let them
through unchecked (a traced graph holds no input checks), and :func:`check_levels` hands back
a proxy pyramid as its levels.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor
from torch.fx import Proxy
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = [
    "check_choice",
    "check_feature_map",
    "check_levels",
    "check_positive",
    "is_tracing",
    "is_transforming",
    "pyramid_channels",
    "pyramid_output_keys",
    "check_same_shape",
    "pair",
    "reduced_channels",
]

Key = TypeVar("Key", bound=Hashable)
"""A pyramid level's key: a name (``"c3"``, ``"layer2"``), a level number, any hashable."""


def is_tracing() -> bool:
    """Whether ``torch.fx`` or ``torch.jit.trace`` is tracing: a graph is recorded for every
    input, so code must not branch on sizes, grad mode or memory format (TorchDynamo, which
    guards on what it branches on, is not counted)."""
    return is_fx_symbolic_tracing() or torch.jit.is_tracing()


def is_transforming() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ``hessian``...) is
    active. Its tensors are wrappers: some in-place ops have no batching rule (``vmap`` then
    loops over the samples) and memory-format queries and conversions are not implemented."""
    return torch._C._are_functorch_transforms_active()


def _traced(value: object) -> bool:
    """Whether ``value`` is a tracer's stand-in for a tensor or a size (see module doc)."""
    return isinstance(value, Proxy) or (torch.jit.is_tracing() and isinstance(value, Tensor))


def check_positive(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``; raise naming ``name`` otherwise.

    A traced size (see module doc) is returned unchecked.
    """
    if _traced(value):
        return value  # type: ignore[return-value]  # stands for an int in the traced graph
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
    and ``torch.export``) count as ints, so a size taken from another tensor stays symbolic;
    so do traced sizes (a ``torch.fx`` proxy of ``x.shape[-2:]`` gives its two items).
    """
    if isinstance(value, Proxy):
        return value[0], value[1]
    values = tuple(value) if isinstance(value, Sequence) else (value, value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
    for v in values:
        check_positive(name, v)
    return values[0], values[1]


def check_feature_map(x: Tensor, *, channels: int | None = None, name: str = "block") -> None:
    """Raise unless ``x`` is a floating NCHW tensor with ``channels`` channels and H, W >= 1.

    An empty batch (N = 0, what detection heads produce for images without proposals) passes,
    as it does through torchvision's blocks. A ``torch.fx`` proxy passes unchecked.
    """
    if isinstance(x, Proxy):
        return
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
    """Raise unless ``tensors`` is a sequence of ``count`` floating-point tensors of one shape.

    ``torch.fx`` proxies pass unchecked (their count is checked where the sequence is real).
    """
    if isinstance(tensors, Proxy):
        return
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(
            f"{name} expected a sequence of Tensors, got {type(tensors).__name__}"
        )
    if count is not None and len(tensors) != count:
        raise ValueError(f"{name} expected {count} inputs, got {len(tensors)}")
    if any(isinstance(x, Proxy) for x in tensors):
        return
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
    features: Sequence[Tensor] | Mapping[Key, Tensor],
    channels: Sequence[int],
    *,
    name: str,
    keys: Sequence[Key] | None = None,
) -> tuple[list[Key] | None, list[Tensor]]:
    """Validate a pyramid given as a sequence (fine to coarse) or a mapping key -> map.

    Returns ``(keys, maps)``: ``keys`` is None for a sequence, the mapping's keys in order
    otherwise (any hashable keys: names, level numbers), so that the caller can hand back the
    same kind of container with the caller's keys. Levels must get coarser from first to last:
    neither height nor width may grow from one level to the next.

    Under ``torch.fx`` the maps pass unchecked; a pyramid that is itself a proxy (the input of
    a traced neck) is taken as a mapping with ``keys`` where they are given, else as a
    sequence of ``len(channels)`` maps.
    """
    if isinstance(features, Proxy):
        if keys is not None:
            return list(keys), [features[k] for k in keys]
        return None, [features[i] for i in range(len(channels))]
    if isinstance(features, Tensor):
        raise TypeError(
            f"{name} expected a sequence or mapping of {len(channels)} feature maps, got one Tensor"
        )
    if isinstance(features, Mapping):
        got_keys: list[Key] | None = list(features.keys())
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
    if any(isinstance(x, Proxy) for x in maps):
        return got_keys, maps
    labels: list[Hashable] = list(got_keys) if got_keys is not None else list(range(len(maps)))
    for label, x, c in zip(labels, maps, channels):
        check_feature_map(x, channels=c, name=f"{name} level {label}")
    # int() here would pin a symbolic batch size to its example value under torch.export.
    if any(x.shape[0] != maps[0].shape[0] for x in maps[1:]):
        batch = sorted({int(x.shape[0]) for x in maps})
        raise ValueError(f"{name} expected one batch size across levels, got {batch}")
    for i in range(1, len(maps)):
        finer, coarser = maps[i - 1].shape[-2:], maps[i].shape[-2:]
        if coarser[0] > finer[0] or coarser[1] > finer[1]:
            raise ValueError(
                f"{name} expected levels fine to coarse (height and width not growing from one "
                f"level to the next), got level {labels[i]} of size {tuple(coarser)} after level "
                f"{labels[i - 1]} of size {tuple(finer)}"
            )
    return got_keys, maps


EXTRA_LEVEL_KEY = "pool"


def pyramid_channels(
    in_channels: Sequence[int] | Mapping[Key, int], *, min_levels: int = 1
) -> tuple[list[Key] | None, list[int]]:
    """Validate a neck's ``in_channels``: a sequence of ints, or a mapping key -> int, or
    timm's ``FeatureInfo`` (a ``features_only`` model's ``feature_info``, read through its
    ``channels()``: timm's feature models return a list of maps, fine to coarse).

    A mapping (for instance ``{"layer1": 256, ...}``, ``{3: 512, 4: 1024, 5: 2048}``, or timm's
    ``feature_info`` turned into a dict) fixes the feature keys the neck accepts, as they are
    (any hashable keys). Returns ``(keys or None, channels)``.
    """
    channels_of = getattr(in_channels, "channels", None)
    if callable(channels_of) and not isinstance(in_channels, (Mapping, Sequence)):
        in_channels = list(channels_of())  # timm's FeatureInfo, without importing timm
    if isinstance(in_channels, Mapping):
        keys: list[Key] | None = list(in_channels)
        channels = list(in_channels.values())
    elif isinstance(in_channels, (int, str)) or not isinstance(in_channels, Sequence):
        raise TypeError(
            "in_channels must be a sequence of ints (one per level, fine to coarse) or a "
            f"mapping key -> int, got {type(in_channels).__name__}"
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
    keys: list[Key] | None, extra: bool | Sequence[str], *, name: str
) -> list[Key | str] | None:
    """The keys a neck returns for input ``keys`` (any hashables, handed back as given): the
    same, plus those of its extra levels.

    ``extra`` names the extra levels; ``True`` stands for the one ``"pool"`` level of
    ``extra_level=True``, ``False`` for none.
    """
    if isinstance(extra, bool):
        extra = [EXTRA_LEVEL_KEY] if extra else []
    if keys is None:
        return None
    out: list[Key | str] = list(keys)
    if not extra:
        return out
    clash = [key for key in extra if key in keys]
    if clash:
        raise ValueError(
            f"{name} adds the key{'s' if len(clash) > 1 else ''} "
            f"{', '.join(map(repr, clash))} for its extra levels {list(extra)}, which the "
            f"input already has (keys {keys})"
        )
    return [*out, *extra]
