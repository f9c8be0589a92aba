"""DART against the authors' golden kept positions and a plain-loop reference."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from vispruner.methods import get_method
from vispruner.methods.dart import DartSignals, dart_keep, dart_selection

GOLDEN = "dart_reference_subset.safetensors"
FULL = Path(os.environ.get("VISPRUNER_GOLDEN_DIR", "/work/shared/golden")) / "dart_reference_public.safetensors"


def golden_cases(path: Path):
    with safe_open(path, "pt") as handle:
        for case in json.loads(handle.metadata()["golden"])["cases"]:
            prefix = f"case{case['case']:02d}."
            yield case, {name[len(prefix) :]: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}


def run_case(case, tensors):
    keys = tensors["key_states"][0]  # (H, S, hd), post-RoPE, as the authors' layer returns them
    keys = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    budget = case["max_num_trunction"]
    if budget is None:
        budget = case["tokens"] * (1 - case["reduction_ratio"])
    return dart_selection(tensors["hidden_states"][0], keys, case["prefix"], case["tokens"], budget)


def test_bundled_golden_case_is_reproduced(data_dir):
    (case, tensors), = golden_cases(data_dir / GOLDEN)
    kept = run_case(case, tensors)
    assert torch.equal(kept, tensors["kept_image_indices"])
    # The whole sequence the authors' forward keeps: prefix, kept image tokens, text.
    length = tensors["hidden_states"].shape[1]
    full = torch.cat([torch.arange(case["prefix"]), kept, torch.arange(case["prefix"] + case["tokens"], length)])
    assert torch.equal(full, tensors["keep_positions"])


@pytest.mark.skipif(not FULL.exists(), reason="the authors' full golden file is not on this machine")
def test_every_public_golden_case_is_reproduced():
    for case, tensors in golden_cases(FULL):
        assert torch.equal(run_case(case, tensors), tensors["kept_image_indices"]), f"golden case {case['case']}"


def test_pivot_order_is_the_authors_set_order(data_dir):
    (case, tensors), = golden_cases(data_dir / GOLDEN)
    order = list(set(tensors["image_pivots"].tolist() + tensors["text_pivots"].tolist()))
    assert order == tensors["pivot_order"].tolist() == case["pivot_order"]
    # ... and it matters: the same pivots visited image-first in topk order keep other tokens.
    assert case["tokens_differing_if_pivots_in_topk_order"] > 0


def plain_reference(hidden, keys, image, text, shares_in_order, pivots=(4, 4)):
    """The procedure written out in float64 with an explicit visiting order; returns kept positions
    and the smallest cosine gap at a share boundary."""
    hidden, keys = hidden.double(), keys.double()
    l1 = keys.abs().sum(-1)
    image_pivots = sorted(image.tolist(), key=lambda p: (-float(l1[p]), p))[: pivots[0]]
    text_pivots = sorted(text.tolist(), key=lambda p: (-float(l1[p]), p))[: pivots[1]]
    order = list(set(image_pivots + text_pivots))
    candidates = [p for p in image.tolist() if p not in image_pivots]
    kept, gap = set(image_pivots), math.inf
    for pivot, share in zip(order, shares_in_order(len(order))):
        share = min(share, len(candidates))
        cos = {c: float(torch.nn.functional.cosine_similarity(hidden[pivot], hidden[c], dim=0)) for c in candidates}
        ranked = sorted(candidates, key=lambda c: cos[c])
        if 0 < share < len(ranked):
            gap = min(gap, cos[ranked[share]] - cos[ranked[share - 1]])
        kept.update(ranked[:share])
        candidates = [c for c in candidates if c not in ranked[:share]]
    return sorted(kept), gap


@st.composite
def sequences(draw):
    prefix, tokens, text = draw(st.integers(0, 6)), draw(st.integers(1, 60)), draw(st.integers(0, 10))
    length = prefix + tokens + text
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(length, draw(st.integers(2, 16)), generator=generator)
    keys = torch.randn(length, draw(st.integers(1, 12)), generator=generator)
    keys *= torch.exp(0.5 * torch.randn(length, 1, generator=generator))
    return hidden, keys, prefix, tokens


@settings(max_examples=80, deadline=None)
@given(sequences(), st.integers(0, 80))
def test_budget_rule_equals_the_plain_reference(sequence, budget):
    hidden, keys, prefix, tokens = sequence
    length = hidden.shape[0]
    image, text = torch.arange(prefix, prefix + tokens), torch.arange(prefix + tokens, length)
    per_pivot = budget // 8
    expected, gap = plain_reference(hidden, keys, image, text, lambda count: [per_pivot] * count)
    assume(gap > 1e-5)
    l1 = keys.abs().sum(-1)
    assume(all(abs(float(a - b)) > 1e-4 for i, a in enumerate(l1) for b in l1[i + 1 :]))
    kept = dart_selection(hidden, keys, prefix, tokens, budget)
    assert kept.tolist() == expected
    if tokens >= 4 and length - prefix - tokens >= 4 and tokens - 4 >= 8 * per_pivot:
        # Where the authors' code runs at all, it keeps p_img + (p_img + p_txt) * TOKEN_TOPK.
        assert len(kept) == 4 + 8 * per_pivot


@settings(max_examples=80, deadline=None)
@given(sequences(), st.integers(1, 70))
def test_exact_count_equals_the_plain_reference(sequence, num_tokens):
    hidden, keys, prefix, tokens = sequence
    image, text = torch.arange(prefix, prefix + tokens), torch.arange(prefix + tokens, hidden.shape[0])
    kept = dart_keep(hidden, keys, image, text, num_tokens)
    assert len(kept) == min(num_tokens, tokens) and kept.unique().numel() == len(kept)
    assert bool((kept >= prefix).all() and (kept < prefix + tokens).all())
    assert torch.equal(kept, kept.sort().values)
    if 4 < num_tokens < tokens:
        def shares(count):
            base, more = divmod(num_tokens - 4, count)
            return [base + 1] * more + [base] * (count - more)

        expected, gap = plain_reference(hidden, keys, image, text, shares)
        l1 = keys.abs().sum(-1)
        assume(gap > 1e-5 and all(abs(float(a - b)) > 1e-4 for i, a in enumerate(l1) for b in l1[i + 1 :]))
        assert kept.tolist() == expected


def test_exact_count_matches_the_authors_at_four_plus_multiples_of_eight(data_dir):
    (case, tensors), = golden_cases(data_dir / GOLDEN)
    keys = tensors["key_states"][0]
    keys = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    hidden, prefix, tokens = tensors["hidden_states"][0], case["prefix"], case["tokens"]
    image, text = torch.arange(prefix, prefix + tokens), torch.arange(prefix + tokens, hidden.shape[0])
    assert torch.equal(dart_keep(hidden, keys, image, text, 68), tensors["kept_image_indices"])
    for num_tokens in (1, 3, 4, 5, 64, 67, 69, 143, 144, 500):
        assert len(dart_keep(hidden, keys, image, text, num_tokens)) == min(num_tokens, tokens)


def test_float_budget_is_the_reduction_ratio_fallback():
    generator = torch.Generator().manual_seed(0)
    hidden, keys = torch.randn(619, 16, generator=generator), torch.randn(619, 8, generator=generator)
    ratio = dart_selection(hidden, keys, 35, 576, 576 * (1 - 0.778))  # 127.87 -> TOKEN_TOPK 15
    assert len(ratio) == 4 + 8 * 15
    assert torch.equal(ratio, dart_selection(hidden, keys, 35, 576, 120))


@pytest.mark.parametrize(
    "tokens, text, budget, kept",
    [
        (576, 1, 64, 4 + 5 * 8),  # one text token: one text pivot (theirs: topk out of range)
        (576, 0, 64, 4 + 4 * 8),  # no text after the image: image pivots only
        (3, 8, 64, 3),  # fewer image tokens than pivots: all of them
        (64, 8, 128, 64),  # too few candidates for the last pivots: they take what is left
    ],
)
def test_where_the_authors_crash_it_takes_what_there_is(tokens, text, budget, kept):
    generator = torch.Generator().manual_seed(1)
    length = 35 + tokens + text
    hidden, keys = torch.randn(length, 16, generator=generator), torch.randn(length, 8, generator=generator)
    assert len(dart_selection(hidden, keys, 35, tokens, budget)) == kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": -1}, "budget must be a finite number >= 0"),
        ({"budget": math.nan}, "budget must be a finite number >= 0"),
        ({"pivot_image_tokens": 0, "pivot_text_tokens": 0}, "must be at least 1"),
        ({"image_length": 0}, r"image_length must be an integer in \[1, 10\]"),
        ({"image_start": 12}, r"image_start must be an integer in \[0, 11\]"),
        ({"key_states": torch.randn(11, 4)}, "one row per position"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    arguments = {
        "hidden_states": torch.randn(12, 4), "key_states": torch.randn(12, 4), "image_start": 2, "image_length": 6,
        "budget": 8,
    }
    with pytest.raises(ValueError, match=message):
        dart_selection(**{**arguments, **kwargs})


def test_registered_method_keeps_num_tokens_per_group_with_text_after_it():
    generator = torch.Generator().manual_seed(4)
    hidden, keys = torch.randn(2, 40, 6, generator=generator), torch.randn(2, 40, 8, generator=generator)
    groups = torch.full((2, 40), -1)
    groups[0, 3:15], groups[0, 20:30], groups[1, 10:35] = 0, 1, 0
    text = groups < 0
    text[1, :4] = False  # padding
    keep = get_method("dart").select(DartSignals(hidden, keys, groups, text, torch.tensor([0, 4])), 5).keep
    assert keep[groups < 0].all()
    assert [int(keep[0, 3:15].sum()), int(keep[0, 20:30].sum()), int(keep[1, 10:35].sum())] == [5, 5, 5]
    after = torch.arange(40)[text[0] & (torch.arange(40) > 14)]
    assert torch.equal(keep[0, 3:15].nonzero().flatten() + 3, dart_keep(hidden[0], keys[0], torch.arange(3, 15), after, 5))
    # Row 1 counts positions from its first real token, as the authors' unpadded sequence does.
    after = torch.arange(36)[text[1, 4:] & (torch.arange(36) > 30)]
    expected = 4 + dart_keep(hidden[1, 4:], keys[1, 4:], torch.arange(6, 31), after, 5)
    assert torch.equal(keep[1, 10:35].nonzero().flatten() + 10, expected)
