"""Reversible, per-instance method wrapping.

Wrappers are set as instance attributes, which shadow the class's methods for that object only;
the class and every other instance stay untouched. Removing a patch puts back exactly what the
instance held before (nothing, or an earlier instance attribute such as an accelerate hook).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

_MISSING = object()


class InstancePatch:
    """A set of instance attributes installed together and restored together."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def wrap(self, owner: object, name: str, wrapper: Callable[..., Any], original: Callable[..., Any] | None = None) -> None:
        """Make ``owner.name`` call ``wrapper(original, *args, **kwargs)``.

        ``original`` defaults to what ``owner.name`` resolves to now. The installed function
        carries the original's signature (``functools.wraps``), which ``generate()`` inspects to
        decide which keyword arguments a model accepts.
        """
        target = getattr(owner, name) if original is None else original

        @functools.wraps(target)
        def patched(*args: Any, **kwargs: Any) -> Any:
            return wrapper(target, *args, **kwargs)

        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, patched)

    def restore(self) -> None:
        """Put back what each patched attribute held, newest first."""
        while self._saved:
            owner, name, previous = self._saved.pop()
            if previous is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)


class Outermost:
    """Runs a wrapper for the outermost of nested calls only; calls made inside it go straight
    to the original (Qwen3-VL's ``get_video_features`` calls ``get_image_features``, and both
    are wrapped)."""

    def __init__(self) -> None:
        self.active = False

    def __call__(self, wrapper: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if self.active:
                return original(*args, **kwargs)
            self.active = True
            try:
                return wrapper(original, *args, **kwargs)
            finally:
                self.active = False

        return guarded


def bind_arguments(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, ``**kwargs`` merged in, so that it can be replayed as ``function(**bound)``."""
    signature = inspect.signature(function)
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(parameter.name, {}))
    return arguments
