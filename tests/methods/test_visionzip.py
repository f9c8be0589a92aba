"""VisionZip against a plain-loop reference written from the paper and the authors' description."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vispruner.methods import VisionSignals, get_method
from vispruner.methods.visionzip import visionzip_selection

from .strategies import exact_unit_vectors, near_duplicates, problems, scores


def reference(features, attention, keys, num_tokens, ratio=10 / 64):
    """One image: features (N, C), attention (N,), keys (N, D) -> keep (N,), dominant (N,),
    merged (N, C), and the smallest gap between a patch's two most similar targets."""
    tokens = features.shape[0]
    keep_count = min(num_tokens, tokens)
    contextual_count = math.floor(keep_count * ratio)
    ranked = sorted(range(tokens), key=lambda i: -float(attention[i]))
    dominant = ranked[: keep_count - contextual_count]
    merged = features.clone().double()
    keep = torch.zeros(tokens, dtype=torch.bool)
    keep[dominant] = True
    is_dominant = keep.clone()
    gap = math.inf
    if contextual_count:
        rest = [i for i in range(tokens) if i not in dominant]
        step = len(rest) // contextual_count
        targets = [rest[j * step] for j in range(contextual_count)]
        groups = {t: [] for t in targets}
        for i in rest:
            if i in groups:
                continue
            similarity = {t: _cosine(keys[i], keys[t]) for t in targets}
            closest = sorted(targets, key=lambda t: (-similarity[t], targets.index(t)))
            if len(closest) > 1:
                gap = min(gap, similarity[closest[0]] - similarity[closest[1]])
            groups[closest[0]].append(i)
        for t, members in groups.items():
            if members:
                merged[t] = features[t].double() + sum(features[i].double() for i in members) / len(members)
            keep[t] = True
    return keep, is_dominant, merged, gap


def _cosine(u, v):
    nu, nv = float(u.double().norm()), float(v.double().norm())
    return 0.0 if nu == 0 or nv == 0 else float(u.double() @ v.double()) / (nu * nv)


def _metric(keys):
    return keys.float().mean(2) if keys.ndim == 4 else keys.float()


@settings(max_examples=100, deadline=None)
@given(problems(), st.sampled_from([10 / 64, 0.0, 0.5, 1.0]) | st.floats(0, 1))
def test_equals_the_plain_loop_reference(problem, ratio):
    s = problem.signals
    selection = visionzip_selection(s.features, s.attention, s.keys, problem.num_tokens, ratio)
    attention, metric = scores(s.attention), _metric(s.keys)
    batch = range(s.features.shape[0])
    references = [reference(s.features[b], attention[b], metric[b], problem.num_tokens, ratio) for b in batch]
    # Near-equal similarities may legitimately order differently in float32 and float64.
    assume(all(gap > 1e-5 for *_, gap in references))
    for b, (keep, dominant, merged, _) in zip(batch, references):
        assert torch.equal(selection.keep[b], keep)
        assert torch.equal(selection.important[b], dominant)
        out = s.features if selection.features is None else selection.features
        torch.testing.assert_close(out[b][keep].double(), merged[keep], rtol=1e-5, atol=1e-5)


def assert_equals_reference(features, attention, keys, num_tokens, ratio):
    selection = visionzip_selection(features, attention, keys, num_tokens, ratio)
    out = features if selection.features is None else selection.features
    gaps = []
    for b in range(features.shape[0]):
        keep, dominant, merged, gap = reference(features[b], attention[b], keys[b], num_tokens, ratio)
        assert torch.equal(selection.keep[b], keep)
        assert torch.equal(selection.important[b], dominant)
        torch.testing.assert_close(out[b][keep].double(), merged[keep], rtol=1e-5, atol=1e-5)
        gaps.append(gap)
    return gaps


@pytest.mark.parametrize("num_tokens,ratio", [(4, 10 / 64), (9, 0.5), (16, 0.5), (25, 10 / 64), (40, 0.5)])
def test_exact_ties_in_attention_and_keys(num_tokens, ratio):
    # Attention on four levels, keys repeating a few +-1 patterns at power-of-two scales: ties
    # straddle the dominant cut and several targets are equally similar, exactly in float32 as
    # in float64. Of tied scores the lower index is dominant; of tied targets the first wins.
    generator = torch.Generator().manual_seed(num_tokens)
    features = torch.randn(2, 48, 5, generator=generator)
    attention = torch.randint(0, 4, (2, 48), generator=generator).float() / 4
    keys = torch.stack([exact_unit_vectors(48, 6, 4, generator) for _ in range(2)])
    keys = keys * 2.0 ** torch.randint(-1, 3, (2, 48, 1), generator=generator)
    assert_equals_reference(features, attention, keys, num_tokens, ratio)


@pytest.mark.parametrize("num_tokens,ratio", [(16, 0.5), (24, 0.5), (12, 0.25)])
def test_near_duplicate_keys(num_tokens, ratio):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 48, 5, generator=generator)
    attention = torch.rand(1, 48, generator=generator)
    keys = near_duplicates(48, 6, 3, 0.03, generator).unsqueeze(0)
    gaps = assert_equals_reference(features, attention, keys, num_tokens, ratio)
    # Close calls that float32 still resolves: the case is as near as it can be made safely.
    assert 1e-5 < min(gaps) < 1e-2


@pytest.mark.parametrize("num_tokens,dominant,contextual", [(64, 54, 10), (128, 108, 20), (192, 162, 30), (32, 27, 5), (1, 1, 0)])
def test_published_split(num_tokens, dominant, contextual):
    features, attention, keys = torch.randn(1, 576, 8), torch.rand(1, 576), torch.randn(1, 576, 4)
    selection = visionzip_selection(features, attention, keys, num_tokens)
    assert int(selection.important.sum()) == dominant
    assert int((selection.keep & ~selection.important).sum()) == contextual


def test_merged_features_keep_the_input_dtype_and_untouched_tokens():
    features = torch.randn(2, 50, 6, dtype=torch.bfloat16)
    selection = visionzip_selection(features, torch.rand(2, 50), torch.randn(2, 50, 3), 20)
    assert selection.features.dtype == torch.bfloat16
    untouched = ~(selection.keep & ~selection.important)
    assert torch.equal(selection.features[untouched], features[untouched])


def test_zero_keys_give_no_nan():
    selection = visionzip_selection(torch.randn(1, 30, 4), torch.rand(1, 30), torch.zeros(1, 30, 5), 10)
    assert torch.isfinite(selection.features).all()


def test_keeping_everything_leaves_features_unchanged():
    features = torch.randn(2, 16, 4)
    selection = visionzip_selection(features, torch.rand(2, 16), torch.randn(2, 16, 2, 3), 16)
    assert selection.keep.all()
    assert selection.features is None or torch.equal(selection.features, features)


def test_registered_with_its_option_and_needs():
    method = get_method("visionzip")
    assert tuple(method.options) == ("contextual_ratio",) and method.needs == frozenset({"attention", "keys"})
    with pytest.raises(ValueError, match=r"method 'visionzip' needs the vision layer's attention keys"):
        method.select(VisionSignals(torch.randn(1, 4, 2), torch.rand(1, 4)), 2)
    with pytest.raises(ValueError, match=r"method 'visionzip' needs the \[CLS\] attention"):
        method.select(VisionSignals(torch.randn(1, 4, 2), None, torch.randn(1, 4, 2)), 2)


F, A = torch.randn(2, 10, 4), torch.rand(2, 10)


@pytest.mark.parametrize(
    "keys,message",
    [
        (None, r"keys must be a torch.Tensor"),
        (torch.randn(10, 3), r"keys must have shape \(B, N, D\) or \(B, N, H, d\)"),
        (torch.ones(2, 10, 3, dtype=torch.long), r"keys must be a floating-point"),
        (torch.randn(3, 10, 3), r"keys batch size must equal the features' batch size 2"),
        (torch.randn(2, 11, 2, 3), r"keys second dimension must equal the number of patches N=10"),
        (torch.randn(2, 10, 0), r"keys must have no empty dimension"),
        (torch.full((2, 10, 3), math.inf), r"keys must be finite"),
    ],
)
def test_bad_keys(keys, message):
    with pytest.raises(ValueError, match=message):
        visionzip_selection(F, A, keys, 4)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, math.nan, "0.2", None])
def test_bad_contextual_ratio(ratio):
    with pytest.raises(ValueError, match=r"contextual_ratio must be a number in \[0, 1\]"):
        visionzip_selection(F, A, torch.randn(2, 10, 3), 4, ratio)
