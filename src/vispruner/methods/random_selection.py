"""Random selection: a seeded uniform draw of patches, the baseline every pruner must beat.

Independent benchmarks found it strong, e.g. Wen et al., "Token Pruning in Multimodal Large
Language Models: Are We Solving the Right Problem?", https://arxiv.org/abs/2502.11501
(The module is not called ``random`` so that it never shadows the standard library.)
"""

from __future__ import annotations

import numbers

import torch

from ._checks import check_features, check_num_tokens
from .base import Method, Selection, VisionSignals, register

MAX_SEED = 2**63 - 1


def random_selection(features: torch.Tensor, num_tokens: int, seed: int = 0) -> Selection:
    """Keep ``min(num_tokens, N)`` patches drawn uniformly without replacement.

    Args:
        features: (B, N, C) patch features; only their shape, device and validity are used.
        num_tokens: T >= 1 visual tokens to keep per image; T >= N keeps all N.
        seed: integer in [0, 2**63 - 1]; the draw depends on ``seed`` and N only.

    Returns:
        A :class:`Selection` whose ``keep`` (B, N) bool has exactly ``min(T, N)`` True per row.

    The draw is made on the CPU with its own generator, so it is the same on every device, it
    never touches the global random state, and an image gets the same positions whatever else
    is in its batch. Every image with N patches therefore gets the same positions for a given
    seed: to average over draws, run with several seeds.
    """
    features = check_features(features)
    batch, tokens, _ = features.shape
    num_keep = min(check_num_tokens(num_tokens), tokens)
    generator = torch.Generator().manual_seed(check_seed(seed))
    chosen = torch.randperm(tokens, generator=generator)[:num_keep].to(features.device)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    keep[:, chosen] = True
    return Selection(keep=keep)


def check_seed(seed: object, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an integer in [0, 2**63 - 1]; got {seed!r}")
    return int(seed)


def _from_signals(signals: VisionSignals, num_tokens: int, seed: int = 0) -> Selection:
    return random_selection(signals.features, num_tokens, seed)


METHOD = register(
    Method(
        name="random",
        select=_from_signals,
        paper="https://arxiv.org/abs/2502.11501",
        summary="seeded uniform random patches (baseline)",
        options={"seed": check_seed},
    )
)
