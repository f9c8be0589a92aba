"""The native step loops (methods/_native.cpp) against the eager code they replace, and the
fallback to that code wherever they cannot be used."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vispruner
from vispruner.bench.timing import dispatched_ops
from vispruner.methods import _native
from vispruner.methods.divprune import divprune_selection

from .reference_vispruner import reference_keep
from .test_vispruner_exact import golden_cases
from .test_vispruner_scale import features_of

needs_native = pytest.mark.skipif(_native.library() is None, reason="no C++ compiler: the native loops are not built")


def eager(function, *args):
    """``function(*args)`` on the eager path, as on a machine without a compiler."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_native, "library", lambda: None)
        return function(*args)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``_native.library`` rebuilt from scratch (an empty cache), and forgotten afterwards."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _native.library.cache_clear()
    yield
    _native.library.cache_clear()


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(2, 300))
    kind = draw(st.sampled_from(["random", "duplicated", "integer", "padded"]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dim = draw(st.integers(1, 12))
    features = torch.cat([features_of(kind, tokens, dim, generator) for _ in range(batch)])
    attention = torch.rand(batch, tokens, generator=generator)
    num_tokens = draw(st.integers(1, tokens))
    ratio = draw(st.sampled_from([0.0, 0.3, 0.5, 0.75, 0.9]))
    return features, attention, num_tokens, ratio


def test_built_wherever_there_is_a_compiler():
    if _native._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    assert _native.library() is not None


@needs_native
@settings(max_examples=80, deadline=None)
@given(problems())
def test_vispruner_native_loop_equals_the_eager_loop(problem):
    # Duplicated and integer features give many exactly tied scores: the sorts must agree on them.
    assert torch.equal(vispruner.select(*problem), eager(vispruner.select, *problem))


@needs_native
@settings(max_examples=60, deadline=None)
@given(problems())
def test_divprune_native_loop_equals_the_eager_loop(problem):
    features, _, num_tokens, _ = problem
    native = divprune_selection(features, num_tokens).keep
    assert torch.equal(native, eager(divprune_selection, features, num_tokens).keep)


def test_golden_masks_on_the_eager_path(data_dir):
    for case, features, attention, expected in golden_cases(data_dir):
        keep = eager(vispruner.select, features, attention, case["visual_token_num"], case["important_ratio"])
        assert torch.equal(keep, expected.bool()), f"golden case {case}"


@pytest.mark.usefixtures("fresh_library")
def test_without_a_compiler_the_eager_path_runs(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert _native.library() is None
    features, attention = torch.randn(1, 100, 8), torch.rand(1, 100)
    assert torch.equal(vispruner.select(features, attention, 10)[0], reference_keep(features[0], attention[0], 10, 0.5))


@pytest.mark.usefixtures("fresh_library")
def test_a_failing_build_or_the_switch_gives_the_eager_path(monkeypatch):
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    assert _native.library() is None
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("VISPRUNER_NATIVE", "0")
    _native.library.cache_clear()
    assert _native.library() is None


@needs_native
def test_a_sort_that_orders_ties_otherwise_is_refused():
    assert _native._sorts_like_torch(_native._argsort(_native.library()))
    # A stable sort is a correct sort, but it orders ties unlike torch's unstable CPU sort.
    assert not _native._sorts_like_torch(lambda values: torch.argsort(values, descending=True, stable=True))


@needs_native
def test_launches_do_not_grow_with_the_steps():
    features, attention = torch.randn(1, 576, 32), torch.rand(1, 16, 576)
    # 64 steps (T = 64) or 69 (T = 16) of duplicate removal: one native call, the same ops.
    counts = {dispatched_ops(lambda k=keep: vispruner.select(features, attention, k, 0.5)) for keep in (16, 64)}
    assert len(counts) == 1 and counts.pop() <= 50
    counts = {dispatched_ops(lambda k=keep: divprune_selection(features, k)) for keep in (8, 64)}
    assert len(counts) == 1 and counts.pop() <= 20
