"""An independent, step-by-step VisPruner for tests: plain Python lists, one image at a time,
similarities recomputed at every step, written from the paper's description of the loop.

It follows the library's documented rule where the authors' code crashes: A takes the even
positions (one more than B when the list is odd), a lone A token scores 0, and a step drops at
most as many tokens as A holds.
"""

from __future__ import annotations

import torch

from vispruner.methods.vispruner import residual_similarity


def reference_keep(features: torch.Tensor, attention: torch.Tensor, num_tokens: int, ratio: float) -> torch.Tensor:
    """features (N, C), attention (N,) or (H, N) -> (N,) bool."""
    scores = attention.float().mean(0) if attention.ndim == 2 else attention.float()
    tokens = features.shape[0]
    keep_count = min(num_tokens, tokens)
    important_count = min(int(num_tokens * ratio), tokens)
    diverse_count = keep_count - important_count
    ranked = scores.argsort(descending=True).tolist()
    important, listed = ranked[:important_count], ranked[important_count:]
    vectors = features.float()
    norms = vectors.norm(dim=-1, keepdim=True)
    unit = torch.where(norms > 0, vectors / norms.clamp_min(1e-12), torch.zeros_like(vectors))
    while len(listed) > diverse_count:
        side_a, side_b = listed[0::2], listed[1::2]
        drop = min(8, len(listed) - diverse_count, len(side_a))
        if side_b:
            closeness = (unit[side_a] @ unit[side_b].T).max(dim=1).values
        else:
            closeness = torch.zeros(len(side_a), device=unit.device)
        survivors = closeness.argsort(descending=True).tolist()[drop:]
        listed = [side_a[i] for i in survivors] + side_b
    keep = torch.zeros(tokens, dtype=torch.bool)
    keep[important + listed] = True
    return keep  # on the CPU; the sorts ran on the inputs' device (their ties are that device's)


def plain_keep(features: torch.Tensor, attention: torch.Tensor, num_tokens: int, ratio: float) -> torch.Tensor:
    """features (N, C), attention (N,) or (H, N) -> (N,) bool: the same loop, but reading the
    similarity the library computes once (``residual_similarity``), so that inputs of any size
    compare exactly, with no last-bit difference from recomputing it in other shapes."""
    scores = attention.float().mean(0) if attention.ndim == 2 else attention.float()
    tokens = features.shape[0]
    important_count = min(int(num_tokens * ratio), tokens)
    diverse_count = min(num_tokens, tokens) - important_count
    ranked = scores.argsort(descending=True)
    important, residual = ranked[:important_count], ranked[important_count:]
    similarity = residual_similarity(features[None], residual[None])[0]
    listed = torch.arange(residual.numel())
    while listed.numel() > diverse_count:
        side_a, side_b = listed[0::2], listed[1::2]
        drop = min(8, listed.numel() - diverse_count, side_a.numel())
        if side_b.numel():
            closeness = similarity[side_a][:, side_b].max(dim=1).values
        else:
            closeness = torch.zeros(side_a.numel())
        survivors = closeness.argsort(descending=True)[drop:]
        listed = torch.cat([side_a[survivors], side_b])
    keep = torch.zeros(tokens, dtype=torch.bool)
    keep[important] = True
    keep[residual[listed]] = True
    return keep
