"""mean_attention_received against the full attention matrix, formed eagerly per segment."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vispruner.adapters.attention_received import mean_attention_received


def eager(query, key, scale, lengths):
    """Per segment: the whole (H, n, n) softmax matrix, averaged over heads and rows."""
    parts, start = [], 0
    for length in lengths:
        q, k = query[:, start : start + length].double(), key[:, start : start + length].double()
        probabilities = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
        parts.append(probabilities.mean(dim=(0, 1)))
        start += length
    return torch.cat(parts).float()


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 23), min_size=1, max_size=4),
    heads=st.integers(1, 3),
    chunk_bytes=st.sampled_from([1, 64, 1000, 2**25]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_eager_matrix_for_any_segments_and_chunking(lengths, heads, chunk_bytes, seed):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    query = torch.randn(heads, total, 8, generator=generator) * 2
    key = torch.randn(heads, total, 8, generator=generator) * 2
    bounds = torch.tensor([0, *lengths]).cumsum(0)
    received = mean_attention_received(query, key, 8**-0.5, segments=bounds, chunk_bytes=chunk_bytes)
    assert received.dtype == torch.float32 and received.shape == (total,)
    torch.testing.assert_close(received, eager(query, key, 8**-0.5, lengths), rtol=1e-5, atol=1e-6)
    # Each segment's queries spread exactly one unit of attention over its keys.
    sums = torch.stack([part.sum() for part in received.split(lengths)])
    torch.testing.assert_close(sums, torch.ones(len(lengths)), rtol=0, atol=1e-5)


def test_one_segment_by_default_and_half_precision_inputs():
    query, key = torch.randn(2, 10, 4).half(), torch.randn(2, 10, 4).half()
    expected = eager(query.float(), key.float(), 0.5, [10])
    torch.testing.assert_close(mean_attention_received(query, key, 0.5), expected, rtol=1e-5, atol=1e-6)


def test_bad_shapes_and_segments_raise():
    query = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match=r"\(H, S, d\)"):
        mean_attention_received(query, query[:, :5], 1.0)
    with pytest.raises(ValueError, match="segments must rise from 0 to S=6"):
        mean_attention_received(query, query, 1.0, segments=torch.tensor([0, 4]))
