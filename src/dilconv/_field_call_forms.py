"""dilconv 0.1's call forms of the measured receptive-field functions, accepted until 0.3.

dilconv 0.1 called them as ``gradient_map(module, input_shape, output_index)`` with
``input_shape`` = ``(C, H, W)`` or ``(N, C, H, W)``; they now take their arguments as
:func:`~dilconv.receptive_field` does: ``(module, input_size, *, in_channels=None,
output_index=None, ...)``. :func:`old_call_forms` turns an old call into the new one and says,
in a ``DeprecationWarning``, what to write instead. Deleting this file and its decorators
removes the old forms.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from dilconv._checks import check_positive

__all__ = ["old_call_forms"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def old_call_forms(positional: int) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Accept 0.1's forms of a function whose ``positional`` arguments follow ``module``.

    The forms: the keyword ``input_shape=``; a ``(C, H, W)`` or ``(N, C, H, W)`` size (``N``
    ignored, ``C`` passed on as ``in_channels``); ``output_index`` as the positional argument
    after the ``positional`` ones. The wrapped function keeps its signature for ``inspect``.
    """

    def decorate(function: Callable[_P, _R]) -> Callable[_P, _R]:
        name = function.__name__

        @functools.wraps(function)
        def wrapper(module: Any, *args: Any, **kwargs: Any) -> _R:
            changes: list[str] = []
            index_moved = len(args) == positional + 1
            if index_moved:
                if "output_index" in kwargs:
                    raise TypeError(f"{name}() got output_index both positionally and as a keyword")
                args, kwargs["output_index"] = args[:-1], args[-1]
            old = "input_size"
            if "input_shape" in kwargs:
                if args or "input_size" in kwargs:
                    raise TypeError(f"{name}() got both input_size and its deprecated alias "
                                    "input_shape")
                kwargs["input_size"] = kwargs.pop("input_shape")
                old = "input_shape"
            size = args[0] if args else kwargs.get("input_size")
            if isinstance(size, Sequence) and len(size) in (3, 4):
                shape = tuple(size)
                for n in shape:
                    check_positive(old, n)
                channels, height, width = shape[-3:]
                given = kwargs.get("in_channels")
                if given is not None and given != channels:
                    raise ValueError(f"in_channels={given} disagrees with C={channels} of the "
                                     f"deprecated (C, H, W) {old} {shape}")
                kwargs["in_channels"] = channels
                if args:
                    args = ((height, width), *args[1:])
                else:
                    kwargs["input_size"] = (height, width)
                changes.append(f"input_size={(height, width)}, in_channels={channels} (which "
                               "may be left out where the module has it) instead of "
                               f"{old}={shape}")
            elif old == "input_shape":
                changes.append("input_size= instead of input_shape=")
            if index_moved:
                changes.append(f"output_index={kwargs['output_index']!r} as a keyword")
            if changes:
                warnings.warn(
                    f"{name}: this call form is deprecated and will be removed in dilconv 0.3; "
                    f"write {'; '.join(changes)}",
                    DeprecationWarning, stacklevel=2,
                )
            return function(module, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
