"""Random selection: a seeded draw, reproducible, uniform, independent of the batch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vispruner.methods import VisionSignals, get_method
from vispruner.methods.random_selection import random_selection


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 80), st.integers(1, 90), st.integers(0, 2**63 - 1))
def test_the_draw_is_the_seeded_permutation_prefix(tokens, num_tokens, seed):
    keep = random_selection(torch.randn(2, tokens, 3), num_tokens, seed).keep
    expected = torch.zeros(tokens, dtype=torch.bool)
    expected[torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))[:num_tokens]] = True
    assert torch.equal(keep, expected.expand(2, -1))


def test_does_not_touch_the_global_random_state():
    features = torch.randn(1, 50, 2)
    torch.manual_seed(3)
    before = torch.rand(1)
    torch.manual_seed(3)
    random_selection(features, 10, seed=7)
    assert torch.equal(torch.rand(1), before)


def test_seeds_differ_and_positions_are_uniform():
    tokens, budget, draws = 20, 5, 4000
    counts = sum(random_selection(torch.zeros(1, tokens, 1), budget, seed).keep[0].long() for seed in range(draws))
    assert len({tuple(random_selection(torch.zeros(1, tokens, 1), budget, s).keep[0].tolist()) for s in range(20)}) > 15
    expected = draws * budget / tokens  # 1000 per position; 5 sigma is about 137
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected * (1 - budget / tokens))


def test_registered_with_the_seed_option():
    method = get_method("random")
    assert tuple(method.options) == ("seed",) and method.needs == frozenset()
    signals = VisionSignals(torch.randn(1, 30, 2))
    assert torch.equal(method.select(signals, 5, seed=4).keep, random_selection(signals.features, 5, 4).keep)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "1", None, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        random_selection(torch.randn(1, 10, 2), 3, seed)
