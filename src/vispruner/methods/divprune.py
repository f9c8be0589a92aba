"""DivPrune: the most diverse subset of patches, by greedy max-min cosine distance.

Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025, https://arxiv.org/abs/2503.02175
"""

from __future__ import annotations

import torch

from . import _graphs, _native, _triton
from ._checks import check_features, check_num_tokens, require_signal
from ._threads import serial
from .base import Method, Selection, VisionSignals, register


def divprune_selection(features: torch.Tensor, num_tokens: int) -> Selection:
    """Choose ``min(num_tokens, N)`` mutually distant patches per image.

    Args:
        features: (B, N, C) token features ([CLS] removed), any float dtype and device; through
            ``apply``, the projected visual tokens, as the authors use.
        num_tokens: T >= 1 visual tokens to keep per image; T >= N keeps all N.

    Returns:
        A :class:`Selection` whose ``keep`` (B, N) bool has exactly ``min(T, N)`` True per row.

    The distance is ``1 - cosine similarity``, computed once in float32 (a zero vector has
    similarity 0 to everything, so distance 1, never NaN). The first token is the one farthest
    from its nearest other token; each next token is the unchosen one whose distance to the
    nearest chosen token is largest (max-min). A chosen token is never chosen again, so exactly
    ``min(T, N)`` distinct tokens are kept even among exact duplicates; ties go to the lowest
    index.
    """
    features = check_features(features)
    batch, tokens, _ = features.shape
    num_keep = min(check_num_tokens(num_tokens), tokens)
    if num_keep == tokens:
        return Selection(keep=torch.ones(batch, tokens, dtype=torch.bool, device=features.device))
    # On a GPU: one CUDA graph launch per call (see _graphs); elsewhere, the same code eagerly.
    (keep,) = _graphs.run(_greedy_max_min, (features,), num_keep)
    return Selection(keep=keep)


def _greedy_max_min(features: torch.Tensor, num_keep: int) -> tuple[torch.Tensor]:
    """The (B, N) keep mask of checked features: no host reads of device values."""
    batch, tokens, _ = features.shape
    # Small inputs on one thread (see _threads; N >= 2 rows, so each norm is one thread's).
    with serial(features.device, features.numel()):
        unit = torch.nn.functional.normalize(features.float(), dim=-1)
    # Largest distance = smallest similarity: work on similarities and skip forming 1 - s.
    similarity = torch.bmm(unit, unit.transpose(1, 2))
    with serial(features.device, similarity.numel()):
        # A token is not its own neighbour; the diagonal is never read again for an unchosen token.
        similarity.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
        first = similarity.amax(dim=2).argmin(dim=1)  # N >= 2 here: every token has a neighbour
    native = _native.library() if features.device.type == "cpu" else None
    if native is not None:
        # The whole loop in one call: the same comparisons on the same similarity.
        return (_native.greedy_max_min(native, similarity, first, num_keep),)
    if _triton.usable(similarity, tokens, _triton.MAX_TOKENS):
        # On a GPU, the whole loop in one kernel launch: the same comparisons again.
        keep = _triton.greedy_max_min(similarity, first, num_keep)
        if keep is not None:
            return (keep,)
    rows = torch.arange(batch, device=features.device)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    keep.scatter_(1, first.unsqueeze(1), True)  # scatter, not index_put: nothing from the host
    nearest = similarity[rows, first]  # (B, N): similarity of each token to its nearest chosen one
    for _ in range(num_keep - 1):
        pick = nearest.masked_fill(keep, torch.inf).argmin(dim=1)
        keep.scatter_(1, pick.unsqueeze(1), True)
        nearest = torch.maximum(nearest, similarity[rows, pick])
    return (keep,)


def _from_signals(signals: VisionSignals, num_tokens: int) -> Selection:
    # The authors measure diversity among the projected tokens, the language model's input.
    return divprune_selection(require_signal(signals, "projected", "divprune"), num_tokens)


METHOD = register(
    Method(
        name="divprune",
        select=_from_signals,
        paper="https://arxiv.org/abs/2503.02175",
        summary="greedy max-min diversity on the cosine distance of the projected tokens",
        needs=frozenset({"projected"}),
    )
)
