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
    pads = [draw(st.integers(0, length - 1)) for _ in range(batch)]
    keep = [[draw(st.booleans()) for _ in range(length)] for _ in range(batch)]
    for row, pad in zip(keep, pads):
        row[draw(st.integers(pad, length - 1))] = True
    with_positions = draw(st.booleans())
    positions = draw(st.sampled_from(["compacted", "original"]))
    return keep, pads, with_positions, positions


def row_reference(keep, values, positions, pad, mode):
    """The row's kept real tokens and their positions, by walking it; padding is skipped."""
    removed = 0
    kept_values, kept_positions = [], []
    for column, (flag, value, position) in enumerate(zip(keep, values, positions)):
        if column < pad:
            continue
        if flag:
            kept_values.append(value)
            kept_positions.append(position - removed if mode == "compacted" else position)
        else:
            removed += 1
    return kept_values, kept_positions, removed


@settings(max_examples=80, deadline=None)
@given(batches())
def test_compact_matches_row_by_row_reference(case):
    keep, pads, with_positions, mode = case
    batch, length = len(keep), len(keep[0])
    keep_t = torch.tensor(keep)
    ids = torch.randint(5, 50, (batch, length))
    mask = torch.tensor([[0] * p + [1] * (length - p) for p in pads])
    positions = (mask.cumsum(1) - 1).clamp(min=0) + 3 if with_positions else None
    labels = torch.randint(0, 50, (batch, length))
    embeds = torch.randn(batch, length, 3)

    out = compact(keep_t, input_ids=ids, inputs_embeds=embeds, attention_mask=mask,
                  position_ids=positions, labels=labels, pad_token_id=1, positions=mode)

    base_positions = positions if positions is not None else torch.arange(length).expand(batch, length)
    rows = [row_reference(keep[b], list(range(length)), base_positions[b].tolist(), pads[b], mode) for b in range(batch)]
    # Exactly as wide as the longest kept row: no padding survives.
    new_length = max(len(columns) for columns, _, _ in rows)
    assert out.input_ids.shape == (batch, new_length)
    for b, (columns, want_positions, removed) in enumerate(rows):
        pad = new_length - len(columns)
        assert out.input_ids[b].tolist() == [1] * pad + ids[b, columns].tolist()
        assert out.attention_mask[b].tolist() == [0] * pad + [1] * len(columns)
        assert out.labels[b].tolist() == [-100] * pad + labels[b, columns].tolist()
        assert out.position_ids[b, pad:].tolist() == want_positions
        assert torch.equal(out.inputs_embeds[b, pad:], embeds[b, columns])
        assert not out.inputs_embeds[b, :pad].any()
        assert out.prefix.shift[b] == (removed if mode == "compacted" else 0)
        assert out.keep[b].nonzero().flatten().tolist() == columns
    assert out.prefix.length == length


def test_dropping_left_padding_moves_no_position():
    # generate's positions start at 0 after the padding; removing it must not make them negative.
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    keep = torch.tensor([[True, True, True, True, False, True], [True, False, False, False, True, True]])
    out = compact(keep, input_ids=torch.arange(12).view(2, 6), attention_mask=mask, position_ids=positions)
    assert out.input_ids.tolist() == [[0, 3, 5], [6, 10, 11]]
    assert out.position_ids.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert out.attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert out.prefix.shift.tolist() == [1, 3]
    original = compact(keep, attention_mask=mask, position_ids=positions, positions="original")
    assert original.position_ids.tolist() == [[0, 0, 2], [0, 4, 5]]
    assert original.prefix.shift.tolist() == [0, 0]


def test_gapped_original_positions_always_get_a_mask():
    keep = torch.tensor([[True, False, True]])
    assert compact(keep, input_ids=torch.arange(3).view(1, 3)).attention_mask is None
    out = compact(keep, input_ids=torch.arange(3).view(1, 3), positions="original")
    assert out.attention_mask.tolist() == [[1, 1]] and out.position_ids.tolist() == [[0, 2]]


def test_gather_follows_the_layout():
    keep = torch.tensor([[False, True, True], [True, True, False]])
    out = compact(keep, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]))
    values = torch.arange(12.0).view(2, 3, 2)
    assert out.gather(values, fill=-1).tolist() == [[[2, 3], [4, 5]], [[-1, -1], [8, 9]]]
    with pytest.raises(ValueError, match=r"start with \(B, L\) = \(2, 3\)"):
        out.gather(values[:, :2])


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
    prefix = CompactedPrefix(length=5, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), shift=torch.tensor([3, 2]))
    full_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    assert prefix.mask(full_mask, past_length=4, new_tokens=1).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert prefix.mask(None, past_length=4, new_tokens=1).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert prefix.positions(torch.tensor([[5], [7]]), past_length=4, new_tokens=1).tolist() == [[2], [5]]
    # Without positions: the full row had 5 + 1 cached tokens, so the next one is 6 there.
    assert prefix.positions(None, past_length=4, new_tokens=2).tolist() == [[3, 4], [4, 5]]
    all_ones = CompactedPrefix(length=5, attention_mask=torch.ones(2, 3, dtype=torch.long), shift=torch.tensor([2, 2]))
    assert all_ones.mask(None, past_length=3, new_tokens=1) is None


def test_prefix_rejects_a_mask_shorter_than_the_prompt():
    prefix = CompactedPrefix(length=5, attention_mask=torch.ones(1, 3, dtype=torch.long), shift=torch.tensor([2]))
    with pytest.raises(ValueError, match="attention_mask must cover the whole prompt"):
        prefix.mask(torch.ones(1, 4, dtype=torch.long), past_length=3, new_tokens=1)


@pytest.mark.parametrize(
    ("keep", "message"),
    [(torch.ones(2, 3, dtype=torch.long), "bool"), (torch.tensor([[True, False], [False, False]]), "at least one")],
)
def test_compact_rejects_bad_keep(keep, message):
    with pytest.raises(ValueError, match=message):
        compact(keep)


def test_compact_rejects_a_row_of_padding_and_unknown_positions():
    keep = torch.tensor([[True, True], [True, False]])
    with pytest.raises(ValueError, match="not padding"):
        compact(keep, attention_mask=torch.tensor([[1, 1], [0, 1]]))
    with pytest.raises(ValueError, match="positions must be one of 'compacted', 'original'; got 'kept'"):
        compact(keep, positions="kept")
