"""FastV: inside the language model, drop the image tokens the last prompt token attends to least.

Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration
for Large Vision-Language Models", ECCV 2024, https://arxiv.org/abs/2403.06764

Unlike the vision-stage methods, FastV runs the first ``layer`` decoder layers on the whole
prompt and prunes between two decoder layers; :mod:`vispruner.adapters.llm_stage` does that
plumbing and calls :func:`fastv_selection` with what layer ``layer - 1`` computed.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ._checks import check_finite, check_integer, check_num_tokens
from .base import Method, Selection, register

#: The decoder layer before which FastV prunes (the paper's K = 2): layers 0 .. K-1 see every token.
DEFAULT_LAYER = 2


@dataclass
class LanguageSignals:
    """What the language model gives FastV, for a batch of B prompts of L tokens.

    Attributes:
        attention: (B, L) attention of each prompt's last token to every token in the decoder
            layer before the cut, averaged over heads.
        groups: (B, L) long; tokens with the same value g >= 0 compete for one budget (an image,
            or one crop of it); -1 marks tokens that are always kept (text, padding, separators).
    """

    attention: torch.Tensor
    groups: torch.Tensor


def fastv_selection(attention: torch.Tensor, groups: torch.Tensor, num_tokens: int) -> Selection:
    """Keep, in each group, the ``num_tokens`` tokens with the highest attention; keep the rest.

    Args:
        attention: (B, L) float scores, e.g. the last prompt token's head-averaged attention.
        groups: (B, L) long group ids; -1 = always kept, g >= 0 = a token of group g. A group id
            names one group per row: the same id in two rows is two groups.
        num_tokens: K >= 1 tokens kept per group; a group of at most K tokens is kept whole.

    Returns:
        A :class:`Selection` whose ``keep`` (B, L) bool holds every token of group -1 and the
        ``min(K, size)`` highest-scoring tokens of each group (ties go to the lower position).
    """
    if not isinstance(attention, torch.Tensor) or attention.ndim != 2 or not attention.is_floating_point():
        raise ValueError(f"attention must be a (B, L) floating-point torch.Tensor; got {_describe(attention)}")
    if not isinstance(groups, torch.Tensor) or groups.shape != attention.shape or groups.dtype != torch.long:
        raise ValueError(
            f"groups must be a (B, L) long tensor shaped like attention {tuple(attention.shape)}; got {_describe(groups)}"
        )
    if bool((groups < -1).any()):
        raise ValueError("groups must be -1 (always kept) or a group id >= 0")
    check_finite(attention, "attention")
    num_tokens = check_num_tokens(num_tokens)

    keep = groups < 0
    # A prompt holds a handful of groups (images or crops): one small sort each.
    candidates = ~keep
    pairs = torch.stack([candidates.nonzero()[:, 0], groups[candidates]], dim=1).unique(dim=0)
    for row, group in pairs.tolist():
        members = (groups[row] == group).nonzero().flatten()
        ranked = torch.argsort(attention[row, members].float(), descending=True, stable=True)
        keep[row, members[ranked[:num_tokens]]] = True
    return Selection(keep=keep)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__


def check_layer(layer: object, num_layers: int) -> int:
    """The FastV ``layer`` option: an integer in [1, num_layers - 1]."""
    if num_layers < 2:
        raise ValueError(
            f"fastv needs a language model of at least 2 decoder layers (it prunes between two); this one has {num_layers}"
        )
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 1 <= layer <= num_layers - 1:
        raise ValueError(
            f"layer must be an integer in [1, {num_layers - 1}] (the language model has {num_layers} decoder layers); "
            f"got {layer!r}"
        )
    return int(layer)


def _from_signals(signals: LanguageSignals, num_tokens: int) -> Selection:
    return fastv_selection(signals.attention, signals.groups, num_tokens)


METHOD = register(
    Method(
        name="fastv",
        select=_from_signals,
        paper="https://arxiv.org/abs/2403.06764",
        summary="prunes image tokens inside the LLM after layer K by the last prompt token's attention",
        stage="llm",
        options={"layer": check_integer},  # the upper bound depends on the model: check_layer
    )
)
