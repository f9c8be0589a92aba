"""FasterVLM against a brute-force reference: the kept set is the top-K by [CLS] attention."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from vispruner.methods import VisionSignals, get_method
from vispruner.methods.fastervlm import fastervlm_selection

from .strategies import problems, scores


def reference_keep(attention: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(N,) scores -> (N,) bool: Python's sort of (score, index) pairs, highest first."""
    ranked = sorted(range(len(attention)), key=lambda i: -float(attention[i]))
    keep = torch.zeros(len(attention), dtype=torch.bool)
    keep[ranked[:num_tokens]] = True
    return keep


@settings(max_examples=100, deadline=None)
@given(problems())
def test_equals_brute_force_top_k(problem):
    signals = problem.signals
    selection = fastervlm_selection(signals.features, signals.attention, problem.num_tokens)
    averaged = scores(signals.attention)
    for b in range(averaged.shape[0]):
        assert torch.equal(selection.keep[b], reference_keep(averaged[b], problem.num_tokens))
        kept, dropped = averaged[b][selection.keep[b]], averaged[b][~selection.keep[b]]
        if dropped.numel():
            assert kept.min() >= dropped.max()
    assert torch.equal(selection.important, selection.keep)


def test_registered_with_no_options_and_needs_attention():
    method = get_method("fastervlm")
    assert tuple(method.options) == () and method.needs == frozenset({"attention"})
    with pytest.raises(ValueError, match=r"method 'fastervlm' needs the \[CLS\] attention"):
        method.select(VisionSignals(torch.randn(1, 4, 2)), 2)


@pytest.mark.parametrize(
    "attention,message",
    [
        (torch.rand(2, 11), r"attention last dimension must equal the number of patches N=10"),
        (torch.rand(3, 10), r"attention batch size must equal the features' batch size 2"),
        (torch.tensor([[float("nan")] * 10] * 2), r"attention must be finite"),
    ],
)
def test_bad_attention(attention, message):
    with pytest.raises(ValueError, match=message):
        fastervlm_selection(torch.randn(2, 10, 4), attention, 3)
