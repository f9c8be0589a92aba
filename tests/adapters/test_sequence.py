"""Sequence compaction against a per-row, list-based reference, and the decode-step translation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vispruner.adapters.sequence import CompactedPrefix, compact


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 10))
    keep = [[draw(st.booleans()) for _ in range(length)] for _ in range(batch)]
    for row in keep:
        row[draw(st.integers(0, length - 1))] = True
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    with_positions = draw(st.booleans())
    return keep, pads, with_positions


def row_reference(keep, values, positions, fill, new_length):
    removed = 0
    kept_values, kept_positions = [], []
    for flag, value, position in zip(keep, values, positions):
        if flag:
            kept_values.append(value)
            kept_positions.append(position - removed)
        else:
            removed += 1
    pad = new_length - len(kept_values)
    return [fill] * pad + kept_values, [0] * pad + kept_positions


@settings(max_examples=60, deadline=None)
@given(batches())
def test_compact_matches_row_by_row_reference(case):
    keep, pads, with_positions = case
    batch, length = len(keep), len(keep[0])
    keep_t = torch.tensor(keep)
    ids = torch.randint(5, 50, (batch, length))
    mask = torch.tensor([[0] * p + [1] * (length - p) for p in pads])
    positions = (mask.cumsum(1) - 1).clamp(min=0) + 3 if with_positions else None
    labels = torch.randint(0, 50, (batch, length))
    embeds = torch.randn(batch, length, 3)

    out = compact(keep_t, input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                  position_ids=positions, labels=labels, pad_token_id=1)

    new_length = max(sum(row) for row in keep)
    base_positions = positions if positions is not None else torch.arange(length).expand(batch, length)
    for b in range(batch):
        want_ids, want_pos = row_reference(keep[b], ids[b].tolist(), base_positions[b].tolist(), 1, new_length)
        want_mask, _ = row_reference(keep[b], mask[b].tolist(), base_positions[b].tolist(), 0, new_length)
        want_labels, _ = row_reference(keep[b], labels[b].tolist(), base_positions[b].tolist(), -100, new_length)
        assert out.input_ids[b].tolist() == want_ids
        assert out.attention_mask[b].tolist() == want_mask
        assert out.labels[b].tolist() == want_labels
        real = [i for i, m in enumerate(want_mask) if m]
        assert [out.position_ids[b, i].item() for i in real] == [want_pos[i] for i in real]
        pad = new_length - sum(keep[b])
        assert torch.equal(out.inputs_embeds[b, pad:], embeds[b][keep_t[b]])
        assert not out.inputs_embeds[b, :pad].any()
    assert out.prefix.length == length
    assert out.prefix.removed.tolist() == [length - sum(row) for row in keep]


def test_nothing_padded_needs_no_mask_and_no_positions():
    keep = torch.tensor([[True, False, True], [False, True, True]])
    out = compact(keep, input_ids=torch.arange(6).view(2, 3))
    assert out.attention_mask is None and out.position_ids is None
    assert out.input_ids.tolist() == [[0, 2], [4, 5]]


def test_uneven_rows_get_a_mask_even_without_one():
    keep = torch.tensor([[True, False, False], [True, True, True]])
    out = compact(keep, input_ids=torch.arange(6).view(2, 3), pad_token_id=9)
    assert out.input_ids.tolist() == [[9, 9, 0], [3, 4, 5]]
    assert out.attention_mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    assert out.position_ids[0, 2] == 0 and out.position_ids[1].tolist() == [0, 1, 2]


def test_prefix_translates_decode_steps():
    prefix = CompactedPrefix(length=5, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), removed=torch.tensor([3, 2]))
    full_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    assert prefix.mask(full_mask, past_length=4, new_tokens=1).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert prefix.mask(None, past_length=4, new_tokens=1).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert prefix.positions(torch.tensor([[5], [7]]), past_length=4, new_tokens=1).tolist() == [[2], [5]]
    # Without positions: the full row had 5 + 1 cached tokens, so the next one is 6 there.
    assert prefix.positions(None, past_length=4, new_tokens=2).tolist() == [[3, 4], [4, 5]]
    all_ones = CompactedPrefix(length=5, attention_mask=torch.ones(2, 3, dtype=torch.long), removed=torch.tensor([2, 2]))
    assert all_ones.mask(None, past_length=3, new_tokens=1) is None


def test_prefix_rejects_a_mask_shorter_than_the_prompt():
    prefix = CompactedPrefix(length=5, attention_mask=torch.ones(1, 3, dtype=torch.long), removed=torch.tensor([2]))
    with pytest.raises(ValueError, match="attention_mask must cover the whole prompt"):
        prefix.mask(torch.ones(1, 4, dtype=torch.long), past_length=3, new_tokens=1)


@pytest.mark.parametrize(
    ("keep", "message"),
    [(torch.ones(2, 3, dtype=torch.long), "bool"), (torch.tensor([[True, False], [False, False]]), "at least one")],
)
def test_compact_rejects_bad_keep(keep, message):
    with pytest.raises(ValueError, match=message):
        compact(keep)
