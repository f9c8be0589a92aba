"""FastV's selection against a brute-force reference: per group, the top-K tokens by attention."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vispruner.methods import get_method
from vispruner.methods.fastv import LanguageSignals, check_layer, fastv_selection


@st.composite
def prompts(draw):
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    attention = torch.rand(batch, length, generator=generator)
    groups = torch.tensor(draw(st.lists(st.lists(st.integers(-1, 3), min_size=length, max_size=length), min_size=batch, max_size=batch)))
    return attention, groups, draw(st.integers(1, 12))


def reference_keep(attention: torch.Tensor, groups: torch.Tensor, num_tokens: int) -> torch.Tensor:
    keep = torch.zeros(groups.shape, dtype=torch.bool)
    for b in range(groups.shape[0]):
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups[b].tolist()):
            if g < 0:
                keep[b, i] = True
            else:
                members.setdefault(g, []).append(i)
        for tokens in members.values():
            for i in sorted(tokens, key=lambda i: (-float(attention[b, i]), i))[:num_tokens]:
                keep[b, i] = True
    return keep


@settings(max_examples=150, deadline=None)
@given(prompts())
def test_equals_brute_force_per_group_top_k(prompt):
    attention, groups, num_tokens = prompt
    keep = fastv_selection(attention, groups, num_tokens).keep
    assert torch.equal(keep, reference_keep(attention, groups, num_tokens))
    for b in range(groups.shape[0]):
        for g in set(groups[b].tolist()) - {-1}:
            size = int((groups[b] == g).sum())
            assert int(keep[b][groups[b] == g].sum()) == min(num_tokens, size)


def test_ties_go_to_the_lower_position_and_ids_are_per_row():
    attention = torch.ones(2, 5)
    groups = torch.tensor([[0, 0, 0, -1, 0], [0, 0, 0, 0, 0]])
    keep = fastv_selection(attention, groups, 2).keep
    assert keep.tolist() == [[True, True, False, True, False], [True, True, False, False, False]]


def test_registered_as_an_llm_stage_method():
    method = get_method("fastv")
    assert method.stage == "llm" and tuple(method.options) == ("layer",)
    signals = LanguageSignals(torch.tensor([[0.1, 0.5, 0.2]]), torch.tensor([[0, 0, -1]]))
    assert method.select(signals, 1).keep.tolist() == [[False, True, True]]


@pytest.mark.parametrize(
    "attention,groups,message",
    [
        (torch.rand(5), torch.zeros(5, dtype=torch.long), r"attention must be a \(B, L\) floating-point"),
        (torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), r"attention must be a \(B, L\) floating-point"),
        (torch.rand(1, 5), torch.zeros(1, 4, dtype=torch.long), r"groups must be a \(B, L\) long tensor shaped like attention \(1, 5\)"),
        (torch.rand(1, 5), torch.zeros(1, 5), r"groups must be a \(B, L\) long tensor"),
        (torch.rand(1, 5), torch.full((1, 5), -2), r"groups must be -1 \(always kept\) or a group id >= 0"),
        (torch.full((1, 5), math.nan), torch.zeros(1, 5, dtype=torch.long), r"attention must be finite"),
    ],
)
def test_bad_signals(attention, groups, message):
    with pytest.raises(ValueError, match=message):
        fastv_selection(attention, groups, 2)


@pytest.mark.parametrize("num_tokens", [0, 1.5, None])
def test_bad_budget(num_tokens):
    with pytest.raises(ValueError, match=r"num_tokens must be an integer >= 1"):
        fastv_selection(torch.rand(1, 3), torch.zeros(1, 3, dtype=torch.long), num_tokens)


@pytest.mark.parametrize("layer", [0, 4, -1, 1.0, True, "2"])
def test_bad_layer(layer):
    with pytest.raises(ValueError, match=r"layer must be an integer in \[1, 3\] \(the language model has 4 decoder layers\)"):
        check_layer(layer, 4)


def test_a_one_layer_language_model_is_refused_plainly():
    with pytest.raises(ValueError, match="fastv needs a language model of at least 2 decoder layers.*this one has 1"):
        check_layer(1, 1)
