"""The registry of token-selection methods.

Every module in this package other than ``base`` and ``_*`` defines one method and registers it
at import, so adding a method is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Method, Selection, VisionSignals, check_options, registry

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    _load_all()
    return sorted(registry())


def get_method(name: str) -> Method:
    """The registered method called ``name``; ``ValueError`` listing the choices otherwise."""
    _load_all()
    try:
        return registry()[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"method must be one of {', '.join(available_methods())}; got {name!r}"
        ) from None


__all__ = [
    "Method",
    "Selection",
    "VisionSignals",
    "available_methods",
    "check_options",
    "get_method",
]
