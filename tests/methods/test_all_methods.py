"""Invariants every registered vision-stage method keeps, on random signals (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings

from vispruner.methods import VisionSignals, available_methods, get_method

from .strategies import problems

VISION_METHODS = [name for name in available_methods() if get_method(name).stage == "vision"]
#: Methods whose batch rows are the crops of one image, coupled on purpose (CDPruner normalises
#: relevance over all of them, as its authors do for LLaVA-NeXT's crops).
COUPLED_ROWS = {"cdpruner"}


@pytest.mark.parametrize("name", VISION_METHODS)
@settings(max_examples=60, deadline=None)
@given(problem=problems())
def test_exact_count_and_well_formed_selection(name, problem):
    signals, num_tokens = problem.signals, problem.num_tokens
    batch, tokens, channels = signals.features.shape
    selection = get_method(name).select(signals, num_tokens)
    assert selection.keep.shape == (batch, tokens) and selection.keep.dtype == torch.bool
    assert selection.keep.sum(1).tolist() == [min(num_tokens, tokens)] * batch
    if selection.important is not None:
        assert not (selection.important & ~selection.keep).any()
    if selection.features is not None:
        assert selection.features.shape == (batch, tokens, channels)
        assert selection.features.dtype == signals.features.dtype


@pytest.mark.parametrize("name", sorted(set(VISION_METHODS) - COUPLED_ROWS))
@settings(max_examples=40, deadline=None)
@given(problem=problems())
def test_batch_equals_images_one_at_a_time(name, problem):
    method = get_method(name)
    batched = method.select(problem.signals, problem.num_tokens)
    for b in range(problem.signals.features.shape[0]):
        single = method.select(problem.image(b), problem.num_tokens)
        assert torch.equal(batched.keep[b : b + 1], single.keep)
        if single.features is not None:
            kept = single.keep[0]
            torch.testing.assert_close(batched.features[b, kept], single.features[0, kept])


@pytest.mark.parametrize("name", VISION_METHODS)
@pytest.mark.parametrize("num_tokens", [0, -1, 2.5, "3", None, True])
def test_bad_budget_names_num_tokens(name, num_tokens):
    signals = VisionSignals(
        torch.randn(2, 12, 4), torch.rand(2, 12), torch.randn(2, 12, 3), (3, 4), torch.randn(2, 12, 5), torch.randn(3, 5)
    )
    with pytest.raises(ValueError, match=r"num_tokens must be an integer >= 1"):
        get_method(name).select(signals, num_tokens)


@pytest.mark.parametrize("name", VISION_METHODS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_one_non_finite_value_is_refused(name, value):
    # One bad entry among finite ones, at neither end of the tensor.
    features, projected, attention = torch.randn(2, 12, 4), torch.randn(2, 12, 5), torch.rand(2, 12)
    features[1, 5, 2] = projected[1, 5, 2] = value
    signals = VisionSignals(features, attention, torch.randn(2, 12, 3), (3, 4), projected, torch.randn(3, 5))
    with pytest.raises(ValueError, match="features must be finite"):
        get_method(name).select(signals, 3)
    if "attention" in get_method(name).needs:
        features[1, 5, 2] = projected[1, 5, 2] = 0.0
        attention[0, 7] = value
        with pytest.raises(ValueError, match="attention must be finite"):
            get_method(name).select(signals, 3)
