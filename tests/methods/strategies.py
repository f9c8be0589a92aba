"""Hypothesis strategies shared by the method tests: random vision signals on small grids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from vispruner.methods import VisionSignals


@dataclass
class Problem:
    signals: VisionSignals
    num_tokens: int

    def image(self, b: int) -> VisionSignals:
        """The signals of image ``b`` alone, as a batch of one."""
        s = self.signals
        return VisionSignals(
            s.features[b : b + 1], s.attention[b : b + 1], s.keys[b : b + 1], s.grid, s.projected[b : b + 1], s.text
        )


@st.composite
def problems(draw, max_side: int = 9, max_extra_tokens: int = 3) -> Problem:
    """B images on a rows x cols grid with features (B, N, C), attention (B, N) or (B, H, N),
    keys (B, N, D) or (B, N, H, d), projected tokens (B, N, D'), an instruction's text embeddings
    (M, D'), and a budget in 1 .. N + max_extra_tokens."""
    batch = draw(st.integers(1, 3))
    rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    tokens = rows * cols
    num_tokens = draw(st.integers(1, tokens + max_extra_tokens))
    heads = draw(st.sampled_from([None, 1, 3]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    features = torch.randn(batch, tokens, draw(st.integers(1, 8)), generator=generator)
    attention = torch.rand((batch, tokens) if heads is None else (batch, heads, tokens), generator=generator)
    key_dim = draw(st.integers(1, 6))
    key_shape = (batch, tokens, key_dim) if heads is None else (batch, tokens, heads, key_dim)
    keys = torch.randn(key_shape, generator=generator)
    projected = torch.randn(batch, tokens, draw(st.integers(1, 8)), generator=generator)
    text = torch.randn(draw(st.integers(1, 4)), projected.shape[-1], generator=generator)
    return Problem(VisionSignals(features, attention, keys, (rows, cols), projected, text), num_tokens)


def scores(attention: torch.Tensor) -> torch.Tensor:
    """(B, N) head-averaged scores of (B, N) or (B, H, N) attention."""
    return attention.float().mean(1) if attention.ndim == 3 else attention.float()


def exact_unit_vectors(count: int, dim: int, nonzeros: int, generator: torch.Generator) -> torch.Tensor:
    """(count, dim) float32 vectors of ``nonzeros`` entries +-1 (``nonzeros`` a square: 1, 4, 9),
    drawn from a handful of patterns so that many repeat exactly. Their norms and all their
    cosine similarities are exact in float32 as in float64, so ties are exact ties."""
    patterns = torch.zeros(max(2, count // 3), dim)
    for row in patterns:
        row[torch.randperm(dim, generator=generator)[:nonzeros]] = 1.0
        row[torch.rand(dim, generator=generator) < 0.5] *= -1
    return patterns[torch.randint(len(patterns), (count,), generator=generator)]


def near_duplicates(count: int, dim: int, clusters: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """(count, dim) vectors in ``clusters`` tight clusters (each a random direction plus noise of
    size ``spread``), with norms from 0.5 to 2: cosine similarities crowd close to 1."""
    centres = torch.randn(clusters, dim, generator=generator)
    members = centres[torch.randint(clusters, (count,), generator=generator)]
    vectors = members + spread * torch.randn(count, dim, generator=generator)
    return vectors * (0.5 + 1.5 * torch.rand(count, 1, generator=generator))
