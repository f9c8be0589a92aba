"""DivPrune against a plain-loop greedy max-min reference in float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings

from vispruner.methods import VisionSignals, get_method
from vispruner.methods.divprune import divprune_selection

from .strategies import exact_unit_vectors, near_duplicates, problems

#: Examples where two candidates' scores are closer than this are skipped: float32 and float64
#: may legitimately order them differently.
MARGIN = 1e-5


def cosine_distance(u: torch.Tensor, v: torch.Tensor) -> float:
    nu, nv = float(u.double().norm()), float(v.double().norm())
    return 1.0 if nu == 0 or nv == 0 else 1.0 - float(u.double() @ v.double()) / (nu * nv)


def reference_keep(features: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, float]:
    """features (N, C) -> keep (N,) and the smallest gap between the best two candidates."""
    tokens = features.shape[0]
    keep = torch.zeros(tokens, dtype=torch.bool)
    count = min(num_tokens, tokens)
    if count == tokens:
        return keep.fill_(True), math.inf
    d = [[cosine_distance(features[i], features[j]) for j in range(tokens)] for i in range(tokens)]
    chosen: list[int] = []
    gap = math.inf
    while len(chosen) < count:
        candidates = [i for i in range(tokens) if i not in chosen]
        if chosen:
            score = {i: min(d[i][s] for s in chosen) for i in candidates}
        else:
            score = {i: min(d[i][j] for j in range(tokens) if j != i) for i in candidates}
        ranked = sorted(candidates, key=lambda i: (-score[i], i))
        if len(ranked) > 1:
            gap = min(gap, score[ranked[0]] - score[ranked[1]])
        chosen.append(ranked[0])
    keep[chosen] = True
    return keep, gap


@settings(max_examples=100, deadline=None)
@given(problems(max_side=7))
def test_equals_the_plain_loop_reference(problem):
    features = problem.signals.features
    references = [reference_keep(features[b], problem.num_tokens) for b in range(features.shape[0])]
    assume(all(gap > MARGIN for _, gap in references))
    keep = divprune_selection(features, problem.num_tokens).keep
    for b, (expected, _) in enumerate(references):
        assert torch.equal(keep[b], expected)


@pytest.mark.parametrize("num_tokens", [1, 2, 5, 11, 23])
def test_exact_ties_go_to_the_lowest_index(num_tokens):
    # A few +-1 patterns, repeated, at power-of-two scales, and two zero vectors: distances are
    # exact in float32 as in float64, and nearly every pick is a tie.
    generator = torch.Generator().manual_seed(num_tokens)
    features = torch.stack([exact_unit_vectors(24, 6, 4, generator) for _ in range(2)])
    features = features * 2.0 ** torch.randint(-1, 3, (2, 24, 1), generator=generator)
    features[:, [3, 17]] = 0.0
    keep = divprune_selection(features, num_tokens).keep
    for b in range(2):
        expected, _ = reference_keep(features[b], num_tokens)
        assert torch.equal(keep[b], expected)


@pytest.mark.parametrize("num_tokens", [4, 8, 16])
def test_near_duplicates(num_tokens):
    generator = torch.Generator().manual_seed(10)
    features = near_duplicates(32, 8, 4, 0.05, generator)
    expected, gap = reference_keep(features, num_tokens)
    assert MARGIN < gap < 1e-2  # close calls that float32 still resolves
    assert torch.equal(divprune_selection(features.unsqueeze(0), num_tokens).keep[0], expected)


def test_exact_duplicates_still_give_distinct_tokens():
    features = torch.randn(1, 6, 4)
    features[0, 1:4] = features[0, 0]
    keep = divprune_selection(features, 5).keep
    # The two distinct vectors first, then copies: five distinct positions, not a repeated pick.
    assert int(keep.sum()) == 5 and keep[0, 4:].all()


def test_zero_vectors_are_at_distance_one():
    features = torch.zeros(1, 5, 3)
    features[0, 0] = torch.tensor([1.0, 0, 0])
    features[0, 1] = torch.tensor([-1.0, 0, 0])
    # Token 1 is at distance 2 from token 0 and 1 from the zero vectors; 0 and 1 are chosen first.
    keep = divprune_selection(features, 2).keep
    assert keep[0, :2].all()


def test_half_precision_gives_the_float32_result():
    features = torch.randn(2, 40, 8).to(torch.bfloat16)
    assert torch.equal(divprune_selection(features, 9).keep, divprune_selection(features.float(), 9).keep)


def test_registered_to_choose_among_the_projected_tokens():
    method = get_method("divprune")
    assert tuple(method.options) == () and method.needs == frozenset({"projected"})
    features, projected = torch.randn(1, 7, 2), torch.randn(1, 7, 5)
    chosen = method.select(VisionSignals(features, projected=projected), 3).keep
    assert torch.equal(chosen, divprune_selection(projected, 3).keep)
    with pytest.raises(ValueError, match="divprune' needs the projected visual tokens"):
        method.select(VisionSignals(features), 3)


@pytest.mark.parametrize(
    "features,message",
    [
        (torch.randn(7, 2), r"features must have shape \(B, N, C\)"),
        (torch.ones(1, 7, 2, dtype=torch.int32), r"features must be a floating-point"),
        (torch.full((1, 7, 2), math.nan), r"features must be finite"),
    ],
)
def test_bad_features(features, message):
    with pytest.raises(ValueError, match=message):
        divprune_selection(features, 3)
