"""VisPruner's selection against the authors' golden masks and an independent reference loop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import vispruner
from vispruner import vispruner_selection

from .reference_vispruner import reference_keep

GOLDEN = "vispruner_reference_public.safetensors"


def golden_cases(data_dir):
    with safe_open(str(data_dir / GOLDEN), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        return [
            (case, *(f.get_tensor(f"case{case['case']}.{k}") for k in ("features", "attentions", "keep_mask")))
            for case in cases
        ]


def test_data_file_only_golden_file_has_the_documented_cases(data_dir):
    """Checks the data file, not the library: the golden file holds the 11 documented cases."""
    cases = golden_cases(data_dir)
    assert len(cases) == 11
    assert {c["features"] for c, *_ in cases} == {"random", "near_duplicates"}


def test_every_golden_mask_is_reproduced(data_dir):
    for case, features, attention, expected in golden_cases(data_dir):
        keep = vispruner.select(features, attention, case["visual_token_num"], case["important_ratio"])
        assert keep.dtype == torch.bool
        assert torch.equal(keep, expected.bool()), f"golden case {case}"


def test_oracle_only_reference_loop_reproduces_golden_too(data_dir):
    """Checks the test oracle, not the library: the reference loop the other tests compare with
    reproduces the authors' golden masks (it is only a good yardstick if it is the published method)."""
    for case, features, attention, expected in golden_cases(data_dir):
        for b in range(features.shape[0]):
            keep = reference_keep(features[b], attention[b], case["visual_token_num"], case["important_ratio"])
            assert torch.equal(keep, expected[b].bool()), f"golden case {case}, image {b}"


@pytest.mark.parametrize(
    "tokens,num_tokens,ratio",
    [
        (576, 63, 0.5),  # N - T_imp odd: the authors' code crashes
        (576, 99, 0.5),
        (576, 64, 0.9),
        (729, 64, 0.5),  # SigLIP-sized grid with an even T_imp
        (576, 8, 0.5),  # a step would drop more than half: crashes there
        (576, 1, 0.0),
        (576, 3, 0.0),
        (100, 2, 0.5),
        (17, 16, 0.0),
        (5, 1, 1.0),
        (1, 1, 0.5),
        (576, 575, 0.3),
        (576, 600, 0.5),
    ],
)
def test_matches_reference_where_authors_code_crashes(tokens, num_tokens, ratio):
    generator = torch.Generator().manual_seed(tokens * 1000 + num_tokens)
    features = torch.randn(2, tokens, 24, generator=generator)
    attention = torch.rand(2, 4, tokens, generator=generator)
    selection = vispruner_selection(features, attention, num_tokens, ratio)
    for b in range(2):
        expected = reference_keep(features[b], attention[b], num_tokens, ratio)
        assert torch.equal(selection.keep[b], expected)
    assert selection.keep.sum(1).tolist() == [min(num_tokens, tokens)] * 2


def test_split_into_important_and_diverse():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 144, 16, generator=generator)
    attention = torch.rand(3, 144, generator=generator)
    selection = vispruner_selection(features, attention, 20, 0.75)
    for b in range(3):
        assert torch.equal(selection.keep[b], reference_keep(features[b], attention[b], 20, 0.75))
    assert selection.important.sum(1).tolist() == [15, 15, 15]
    assert not (selection.important & ~selection.keep).any()
    top = attention.argsort(dim=1, descending=True)[:, :15]
    assert torch.equal(selection.important.gather(1, top), torch.ones(3, 15, dtype=torch.bool))


def test_all_tokens_when_budget_covers_the_image():
    features = torch.randn(2, 50, 8)
    attention = torch.rand(2, 50)
    assert vispruner.select(features, attention, 50).all()
    assert vispruner.select(features, attention, 1000, 1.0).all()


def test_zero_feature_vectors_do_not_produce_nan():
    features = torch.randn(1, 64, 8)
    features[0, ::2] = 0.0  # padding rows
    attention = torch.rand(1, 64)
    selection = vispruner_selection(features, attention, 10, 0.5)
    assert selection.keep.sum().item() == 10
    expected = reference_keep(features[0], attention[0], 10, 0.5)
    assert torch.equal(selection.keep[0], expected)
