"""vispruner: training-free visual token pruning for vision-language models.

Importing the package is cheap: torch and transformers load on first use of what needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "select": "vispruner.methods.vispruner",
    "vispruner_selection": "vispruner.methods.vispruner",
    "Selection": "vispruner.methods.base",
    "VisionSignals": "vispruner.methods.base",
    "available_methods": "vispruner.methods",
    "get_method": "vispruner.methods",
    "apply": "vispruner.api",
    "remove": "vispruner.api",
    "pruned": "vispruner.api",
    "last_selection": "vispruner.api",
    "instructions": "vispruner.api",
}


#: Submodules reachable as attributes (``vispruner.viz.draw_selection``), imported on first use.
_SUBMODULES = ("viz",)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = import_module(f"vispruner.{name}")
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vispruner' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))


__all__ = ["__version__", *_LAZY, *_SUBMODULES]
