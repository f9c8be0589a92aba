"""The GPU path: VisPruner's fixed-shape duplicate removal against the partner lists, and
selections replayed from CUDA graphs against the same code run eagerly (those need CUDA)."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings

import vispruner
from vispruner.bench.timing import dispatched_ops
from vispruner.methods import _graphs
from vispruner.methods import vispruner as vispruner_module
from vispruner.methods.cdpruner import cdpruner_selection
from vispruner.methods.divprune import divprune_selection

from .test_native import eager, problems
from .test_vispruner_exact import golden_cases

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def dense(monkeypatch) -> None:
    """Make the CPU take the GPU's duplicate removal."""
    monkeypatch.setattr(vispruner_module._native, "library", lambda: None)
    monkeypatch.setattr(
        vispruner_module,
        "_remove_duplicates",
        lambda features, residual, budget: vispruner_module._remove_duplicates_dense(
            vispruner_module.residual_similarity(features, residual), residual, budget
        ),
    )


@settings(max_examples=80, deadline=None)
@given(problems())
def test_dense_removal_equals_the_partner_lists(problem):
    # Duplicated and integer features tie many similarities: both must read the same maxima.
    expected = eager(vispruner.select, *problem)
    with pytest.MonkeyPatch.context() as patch:
        dense(patch)
        assert torch.equal(vispruner.select(*problem), expected)


def test_dense_removal_gives_the_golden_masks(data_dir, monkeypatch):
    dense(monkeypatch)
    for case, features, attention, expected in golden_cases(data_dir):
        keep = vispruner.select(features, attention, case["visual_token_num"], case["important_ratio"])
        assert torch.equal(keep, expected.bool()), f"golden case {case}"


def test_off_cuda_a_call_is_the_function_itself():
    calls = []

    def function(tensor, option):
        calls.append(option)
        return (tensor + option,)

    (out,) = _graphs.run(function, (torch.ones(3),), 2)
    assert calls == [2] and torch.equal(out, torch.full((3,), 3.0))
    assert not _graphs.enabled(torch.device("cpu"))


def cuda_problem(tokens: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, tokens, width, generator=generator).cuda()
    attention = torch.rand(1, 16, tokens, generator=generator).cuda()
    return features, attention


@needs_cuda
@pytest.mark.parametrize("tokens, width, num_tokens", [(576, 1024, 64), (576, 1024, 16), (729, 1152, 81), (300, 8, 7)])
def test_replayed_selection_equals_the_eager_one(monkeypatch, tokens, width, num_tokens):
    _graphs.clear()
    for seed in range(3):  # the first call captures, the next replay on new inputs
        features, attention = cuda_problem(tokens, width, seed)
        graphed = vispruner.methods.vispruner.vispruner_selection(features, attention, num_tokens)
        monkeypatch.setenv("VISPRUNER_CUDA_GRAPHS", "0")
        plain = vispruner.methods.vispruner.vispruner_selection(features, attention, num_tokens)
        monkeypatch.delenv("VISPRUNER_CUDA_GRAPHS")
        assert torch.equal(graphed.keep, plain.keep) and torch.equal(graphed.important, plain.important)
        assert int(graphed.keep.sum()) == num_tokens
        divprune = divprune_selection(features, num_tokens).keep
        monkeypatch.setenv("VISPRUNER_CUDA_GRAPHS", "0")
        assert torch.equal(divprune, divprune_selection(features, num_tokens).keep)
        monkeypatch.delenv("VISPRUNER_CUDA_GRAPHS")
    assert len(_graphs._graphs) == 2  # one graph per method for this shape, reused


@needs_cuda
def test_replayed_cdpruner_equals_the_eager_one(monkeypatch):
    _graphs.clear()
    generator = torch.Generator().manual_seed(0)
    for tokens in (576, 576, 100):  # capture, replay on new inputs, another shape
        features = torch.randn(2, tokens, 64, generator=generator).cuda()
        image_embeds = torch.randn(2, tokens, 32, generator=generator).cuda()
        text_embeds = torch.randn(3, 32, generator=generator).cuda()
        graphed = cdpruner_selection(features, image_embeds, text_embeds, 16)
        monkeypatch.setenv("VISPRUNER_CUDA_GRAPHS", "0")
        assert torch.equal(graphed, cdpruner_selection(features, image_embeds, text_embeds, 16))
        monkeypatch.delenv("VISPRUNER_CUDA_GRAPHS")
        assert graphed.sum(dim=1).tolist() == [16, 16]


@needs_cuda
def test_a_replayed_call_launches_a_handful_of_ops():
    _graphs.clear()
    features, attention = cuda_problem(576, 1024)
    vispruner.select(features, attention, 64)  # captures
    count = dispatched_ops(lambda: vispruner.select(features, attention, 64))
    # The checks (a few reductions read back), the input copies, the replay, the output clones.
    assert count < 50, count


@needs_cuda
def test_a_function_that_reads_the_device_runs_eagerly_with_a_warning():
    _graphs.clear()

    def syncing(tensor):
        return (tensor[: int(tensor.sum().item() > 0) + 1] * 2,)

    tensor = torch.ones(4, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (out,) = _graphs.run(syncing, (tensor,))
    assert torch.equal(out.cpu(), torch.full((2,), 2.0))
    assert any("could not be captured" in str(w.message) for w in caught)
    (again,) = _graphs.run(syncing, (tensor,))  # remembered: no second capture
    assert torch.equal(again.cpu(), torch.full((2,), 2.0))
