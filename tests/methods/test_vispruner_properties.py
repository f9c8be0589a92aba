"""Invariants of VisPruner's selection, over many shapes and budgets (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vispruner
from vispruner import vispruner_selection

from .reference_vispruner import reference_keep


@st.composite
def problems(draw, max_tokens: int = 80):
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, max_tokens))
    dim = draw(st.integers(1, 12))
    heads = draw(st.sampled_from([None, 1, 3]))
    num_tokens = draw(st.integers(1, tokens + 5))
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9, 1.0]) | st.floats(0, 1))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, tokens, dim, generator=generator)
    shape = (batch, tokens) if heads is None else (batch, heads, tokens)
    attention = torch.rand(shape, generator=generator)
    return features, attention, num_tokens, ratio


@settings(max_examples=150, deadline=None)
@given(problems())
def test_count_and_important_tokens(problem):
    features, attention, num_tokens, ratio = problem
    selection = vispruner_selection(features, attention, num_tokens, ratio)
    batch, tokens, _ = features.shape
    assert selection.keep.shape == (batch, tokens) and selection.keep.dtype == torch.bool
    assert selection.keep.sum(1).tolist() == [min(num_tokens, tokens)] * batch
    scores = attention.mean(1) if attention.ndim == 3 else attention
    top = scores.argsort(dim=1, descending=True)[:, : min(int(num_tokens * ratio), tokens)]
    assert selection.keep.gather(1, top).all()
    assert torch.equal(selection.important.sum(1), torch.full((batch,), top.shape[1]))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_equals_the_step_by_step_reference(problem):
    features, attention, num_tokens, ratio = problem
    keep = vispruner.select(features, attention, num_tokens, ratio)
    for b in range(features.shape[0]):
        assert torch.equal(keep[b], reference_keep(features[b], attention[b], num_tokens, ratio))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_batch_equals_images_one_at_a_time(problem):
    features, attention, num_tokens, ratio = problem
    batched = vispruner.select(features, attention, num_tokens, ratio)
    for b in range(features.shape[0]):
        single = vispruner.select(features[b : b + 1], attention[b : b + 1], num_tokens, ratio)
        assert torch.equal(batched[b : b + 1], single)


@settings(max_examples=60, deadline=None)
@given(problems(), st.randoms(use_true_random=False))
def test_permuting_patches_permutes_the_mask(problem, rnd):
    features, attention, num_tokens, ratio = problem
    tokens = features.shape[1]
    perm = list(range(tokens))
    rnd.shuffle(perm)
    perm = torch.tensor(perm)
    keep = vispruner.select(features, attention, num_tokens, ratio)
    permuted = vispruner.select(features[:, perm], attention[..., perm], num_tokens, ratio)
    assert torch.equal(permuted, keep[:, perm])


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_inputs_give_the_float32_result(problem, dtype):
    features, attention, num_tokens, ratio = problem
    low_features, low_attention = features.to(dtype), attention.to(dtype)
    expected = vispruner.select(low_features.float(), low_attention.float(), num_tokens, ratio)
    assert torch.equal(vispruner.select(low_features, low_attention, num_tokens, ratio), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=20, deadline=None)
@given(problems())
def test_on_cuda_the_result_is_the_reference_on_that_device(problem):
    # Off the CPU, images are not chunked, the kernels differ, and CUDA's unstable sort orders
    # ties otherwise than the CPU's (one-dimensional features tie every similarity at +-1): the
    # reference runs its sorts on the GPU too.
    features, attention, num_tokens, ratio = problem
    features, attention = features.cuda(), attention.cuda()
    keep = vispruner.select(features, attention, num_tokens, ratio)
    assert keep.device.type == "cuda"
    for b in range(features.shape[0]):
        assert torch.equal(keep[b].cpu(), reference_keep(features[b], attention[b], num_tokens, ratio))
