"""VisPruner at high resolution, in chunks and with ties: the selection against plain loops.

``plain_keep`` reads the similarity the library computes once (``residual_similarity``) and
scans every row at every step, so it compares exactly at any N; ``reference_keep`` recomputes
the similarity at every step and is used where the inputs keep its products exact.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vispruner
from vispruner.methods import vispruner as vispruner_module

from .reference_vispruner import plain_keep, reference_keep


def features_of(kind: str, tokens: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(1, N, C) features: random, duplicated (each vector several times: tied similarities),
    small integers (many tied similarities), or random with zero (padding) vectors."""
    if kind == "duplicated":
        distinct = torch.randn(1, max(1, tokens // 5), dim, generator=generator)
        pick = torch.randint(0, distinct.shape[1], (tokens,), generator=generator)
        return distinct[:, pick]
    if kind == "integer":
        return torch.randint(-2, 3, (1, tokens, dim), generator=generator).float()
    features = torch.randn(1, tokens, dim, generator=generator)
    if kind == "padded":
        features[:, torch.rand(tokens, generator=generator) < 0.2] = 0.0
    return features


@st.composite
def large_problems(draw, low: int, high: int):
    tokens = draw(st.integers(low, high))
    dim = draw(st.integers(1, 16))
    kind = draw(st.sampled_from(["random", "duplicated", "integer", "padded"]))
    # Budgets from a few tokens to a tenth of the image; the ratio makes the residual odd or even.
    num_tokens = draw(st.integers(1, tokens // 10))
    ratio = draw(st.sampled_from([0.0, 0.3, 0.5, 0.75]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    features = features_of(kind, tokens, dim, generator)
    attention = torch.rand(1, tokens, generator=generator)
    return features, attention, num_tokens, ratio


def assert_equals_plain_loop(problem) -> None:
    features, attention, num_tokens, ratio = problem
    keep = vispruner.select(features, attention, num_tokens, ratio)
    assert torch.equal(keep[0], plain_keep(features[0], attention[0], num_tokens, ratio))


@settings(max_examples=8, deadline=None)
@given(large_problems(1000, 2000))
def test_thousands_of_tokens_equal_the_plain_loop(problem):
    assert_equals_plain_loop(problem)


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(large_problems(4000, 9000))
def test_high_resolution_equals_the_plain_loop(problem):
    assert_equals_plain_loop(problem)


@pytest.mark.parametrize(
    "kind,tokens,num_tokens,ratio",
    [
        ("random", 1537, 154, 0.5),  # odd residual
        ("duplicated", 2048, 61, 0.5),
        ("integer", 1200, 7, 0.0),  # down to 7 tokens: the list shrinks four times
        ("padded", 1537, 154, 0.3),
        ("integer", 2048, 205, 0.5),
        ("duplicated", 1201, 120, 0.0),
    ],
)
def test_fixed_large_cases_equal_the_plain_loop(kind, tokens, num_tokens, ratio):
    generator = torch.Generator().manual_seed(tokens + num_tokens)
    features = features_of(kind, tokens, 8, generator)
    attention = torch.rand(1, tokens, generator=generator)
    assert_equals_plain_loop((features, attention, num_tokens, ratio))


@pytest.mark.parametrize("per_chunk", [1, 2])
def test_chunked_batch_equals_its_images_one_at_a_time(monkeypatch, per_chunk):
    generator = torch.Generator().manual_seed(per_chunk)
    batch, tokens, dim, num_tokens = 5, 200, 12, 20
    features = torch.randn(batch, tokens, dim, generator=generator)
    attention = torch.rand(batch, 3, tokens, generator=generator)
    length = tokens - num_tokens // 2
    # Chunks of ``per_chunk`` images: 5 images make 5 chunks, or 2 + 2 + 1.
    monkeypatch.setattr(vispruner_module, "CPU_CHUNK_BYTES", per_chunk * 4 * length * (dim + length))
    # Submatrices copied a few rows at a time as well.
    monkeypatch.setattr(vispruner_module, "SUBMATRIX_BLOCK", 1000)
    chunks = vispruner_module._batch_chunks(features, length)
    assert chunks[0] == slice(0, per_chunk) and len(chunks) == -(-batch // per_chunk)
    batched = vispruner.select(features, attention, num_tokens)
    for b in range(batch):
        single = vispruner.select(features[b : b + 1], attention[b : b + 1], num_tokens)
        assert torch.equal(batched[b : b + 1], single)
        assert torch.equal(batched[b], reference_keep(features[b], attention[b], num_tokens, 0.5))


@pytest.mark.parametrize("quantise", ["bfloat16", "integer"])
@pytest.mark.parametrize("num_tokens,ratio", [(64, 0.5), (64, 0.9), (32, 0.25), (100, 1.0)])
def test_tied_attention_ranks_as_the_reference(quantise, num_tokens, ratio):
    # Tied [CLS] scores: the important set and the residual order both follow torch.argsort's
    # (unstable) order of the tied scores, as the authors' code does.
    generator = torch.Generator().manual_seed(num_tokens)
    batch, tokens = 4, 576
    features = torch.randn(batch, tokens, 16, generator=generator)
    if quantise == "bfloat16":
        attention = torch.rand(batch, tokens, generator=generator).softmax(-1).to(torch.bfloat16)
    else:
        attention = torch.randint(0, 6, (batch, tokens), generator=generator).float()
    scores = attention.float()
    assert scores.unique().numel() < tokens // 2  # many ties
    selection = vispruner.vispruner_selection(features, attention, num_tokens, ratio)
    for b in range(batch):
        expected = reference_keep(features[b], attention[b], num_tokens, ratio)
        assert torch.equal(selection.keep[b], expected), f"image {b}"
        important = scores[b].argsort(descending=True)[: int(num_tokens * ratio)]
        assert torch.equal(selection.important[b].nonzero().squeeze(1), important.sort().values)


@pytest.mark.parametrize("tile", [1, 3, 7, 1024])
@pytest.mark.parametrize("tokens", [37, 38])
def test_similarity_is_the_symmetric_cosine_whatever_the_mirror_tile(monkeypatch, tile, tokens):
    """``residual_similarity`` computes half the products and mirrors the rest tile by tile; the
    tests against ``plain_keep`` read that same matrix, so it is checked here on its own: exactly
    symmetric, and the cosine of the residual tokens (zero vectors: 0) computed in one product."""
    monkeypatch.setattr(vispruner_module, "MIRROR_TILE", tile)
    generator = torch.Generator().manual_seed(tokens)
    features = features_of("padded", tokens + 5, 9, generator).expand(2, -1, -1).clone()
    residual = torch.stack([torch.randperm(tokens + 5, generator=generator)[:tokens] for _ in range(2)])
    similarity = vispruner_module.residual_similarity(features, residual)
    assert torch.equal(similarity, similarity.transpose(1, 2))
    unit = torch.nn.functional.normalize(features.gather(1, residual[..., None].expand(-1, -1, 9)), dim=-1)
    torch.testing.assert_close(similarity, unit @ unit.transpose(1, 2), atol=1e-6, rtol=0)
