"""What every token-selection method shares: its inputs, its output, and the registry.

A method is a pure function on tensors. Model plumbing (hooks, compaction of the sequence) lives
in :mod:`vispruner.adapters`; a method never sees a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping

if TYPE_CHECKING:
    import torch


@dataclass
class VisionSignals:
    """What the vision tower gives a method, for a batch of B images (or crops) of N patches.

    Attributes:
        features: (B, N, C) patch features of the layer that feeds the projector, [CLS] removed.
        attention: (B, N) [CLS]-to-patch attention of that layer, averaged over heads, or None
            when the model has no [CLS] token.
        keys: (B, N, H, d) attention keys of that layer per head (the key projection's output),
            or None.
        grid: (rows, cols) of the patch grid, rows * cols == N, or None when not a grid.
        projected: (B, N, D) the projector's output for ``features`` (the tokens the language
            model would receive), for methods that choose among those; None unless a method
            lists ``"projected"`` in its ``needs``.
        text: (M, D) the instruction of the prompt these images belong to, as the language
            model's input embeddings of its text tokens (see docs/methods.md, CDPruner); None
            unless a method lists ``"text"`` in its ``needs``. All B rows belong to one image.
            With CDPruner's ``clip`` option: (M, E) CLIP text embeddings of the question, one
            row per 77-token segment.
        joint: (B, N, E) the patches in CLIP's joint space (CLIP's visual projection of the
            post-layernormed ``features``); None unless CDPruner's ``clip`` option is given.
    """

    features: "torch.Tensor"
    attention: "torch.Tensor | None" = None
    keys: "torch.Tensor | None" = None
    grid: "tuple[int, int] | None" = None
    projected: "torch.Tensor | None" = None
    text: "torch.Tensor | None" = None
    joint: "torch.Tensor | None" = None


@dataclass
class Selection:
    """The tokens a method keeps.

    Attributes:
        keep: (B, N) bool, True where the token goes on to the language model.
        important: (B, N) bool subset of ``keep`` chosen by an importance signal (the rest of
            ``keep`` was chosen for diversity or coverage); None when the method makes no split.
        features: (B, N, C) features to use at the kept positions, for methods that merge
            tokens; None when kept tokens keep their own features.
    """

    keep: "torch.Tensor"
    important: "torch.Tensor | None" = None
    features: "torch.Tensor | None" = None


Stage = Literal["vision", "llm"]

#: ``check(value, name)`` returns the option's value (normalised) or raises ``ValueError`` that
#: names the option and its allowed range, e.g. :func:`vispruner.methods._checks.check_ratio`.
OptionCheck = Callable[[Any, str], Any]


@dataclass(frozen=True, eq=False)
class Method:
    """A registered method.

    ``select(signals, num_tokens, **options) -> Selection`` for vision-stage methods, which prune
    before the language model. LLM-stage methods (FastV) prune inside the language model; their
    adapters call ``select`` with the language-model signals they document.

    ``options`` maps each option's name to the check of its allowed range, so that
    :func:`check_options` (which ``apply`` and the command line call) rejects a bad value before
    anything runs. A range that depends on the model (FastV's ``layer``) is checked again when
    the method is installed on it.
    """

    name: str
    select: Callable[..., Selection]
    paper: str
    summary: str
    stage: Stage = "vision"
    needs: frozenset[str] = field(default_factory=frozenset)
    options: Mapping[str, OptionCheck] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a method module calls this once, at import)."""
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def registry() -> dict[str, Method]:
    return _REGISTRY


def check_options(method: Method, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with each value checked against ``method``'s declared range (and normalised).

    Raises ``ValueError`` naming an option the method does not take, or a value out of range.
    """
    unknown = sorted(set(options) - set(method.options))
    if unknown:
        allowed = ", ".join(method.options) or "none"
        raise ValueError(
            f"method {method.name!r} got unknown option(s) {', '.join(unknown)}; "
            f"allowed options: {allowed}"
        )
    return {name: method.options[name](value, name) for name, value in options.items()}
