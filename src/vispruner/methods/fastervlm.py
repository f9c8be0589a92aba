"""FasterVLM: the patches the [CLS] token attends to most, nothing else.

Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM
Inference Faster", arXiv 2412.01818v1, https://arxiv.org/abs/2412.01818v1 (the same authors'
VisPruner extends it with diverse tokens; FasterVLM is VisPruner with ``important_ratio=1``).
"""

from __future__ import annotations

import torch

from ._checks import require_signal
from .base import Method, Selection, VisionSignals, register
from .vispruner import vispruner_selection


def fastervlm_selection(features: torch.Tensor, attention: torch.Tensor, num_tokens: int) -> Selection:
    """Keep the ``min(num_tokens, N)`` patches with the highest [CLS] attention in each image.

    Args:
        features: (B, N, C) patch features ([CLS] removed); only their shape, device and validity
            are used.
        attention: (B, N) [CLS]-to-patch scores, or (B, H, N) per-head [CLS] attention, which is
            averaged over heads.
        num_tokens: T >= 1 visual tokens to keep per image; T >= N keeps all N.

    Returns:
        A :class:`Selection` whose ``keep`` (B, N) bool has exactly ``min(T, N)`` True per row;
        ``important`` equals ``keep`` (every kept token was chosen by attention).
    """
    return vispruner_selection(features, attention, num_tokens, important_ratio=1.0)


def _from_signals(signals: VisionSignals, num_tokens: int) -> Selection:
    return fastervlm_selection(signals.features, require_signal(signals, "attention", "fastervlm"), num_tokens)


METHOD = register(
    Method(
        name="fastervlm",
        select=_from_signals,
        paper="https://arxiv.org/abs/2412.01818v1",
        summary="[CLS]-attention top-K (VisPruner with important_ratio=1)",
        needs=frozenset({"attention"}),
    )
)
