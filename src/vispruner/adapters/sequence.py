"""Shortening a batch of token sequences, and keeping a KV cache built from the short one usable.

These helpers know nothing about images or models: given which tokens to keep, they compact the
tensors that run along the sequence (ids, embeddings, mask, positions, labels), and translate the
full-length mask and positions that ``generate()`` (or a hand-written decode loop) keeps passing
after the prefill into the compacted coordinates of the cache. Vision-stage pruning uses them
before the language model; an LLM-stage method can use them between two decoder layers.

Padding (mask 0) is always dropped: the compacted batch is exactly as wide as its longest kept
row, whatever padding the input carried, and it never moves a real token's position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .positions import check_positions

#: Label value that the loss ignores, the Hugging Face convention.
IGNORE_INDEX = -100

@dataclass
class CompactedPrefix:
    """How a compacted prefill maps onto the full-length sequence the caller still holds.

    Attributes:
        length: L, the length of the full prefill sequence.
        attention_mask: (B, L') 2D mask of the compacted prefill (padding added on the left is 0).
        shift: (B,) how far each row's positions moved back at the end of the prompt: the real
            (unpadded) tokens removed from it with compacted positions, 0 with original ones.
    """

    length: int
    attention_mask: torch.Tensor
    shift: torch.Tensor

    def mask(self, attention_mask: torch.Tensor | None, past_length: int, new_tokens: int) -> torch.Tensor | None:
        """The compacted 2D mask for a step that adds ``new_tokens`` to a cache of ``past_length``.

        ``attention_mask`` is the caller's full-length 2D mask (prefill columns followed by one
        column per token since), or None when the caller dropped an all-ones mask.
        """
        if attention_mask is None:
            if bool(self.attention_mask.all()):
                return None
            extra = past_length + new_tokens - self.attention_mask.shape[1]
            ones = self.attention_mask.new_ones(self.attention_mask.shape[0], extra)
            return torch.cat([self.attention_mask, ones], dim=1)
        if attention_mask.ndim != 2:
            raise NotImplementedError(
                "after a pruned prefill, attention_mask must be the 2D (batch, length) padding mask; "
                f"got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape[1] < self.length:
            raise ValueError(
                f"attention_mask must cover the whole prompt ({self.length} columns) plus the tokens "
                f"generated since; got {attention_mask.shape[1]} columns"
            )
        tail = attention_mask[:, self.length :].to(self.attention_mask.dtype)
        return torch.cat([self.attention_mask, tail], dim=1)

    def positions(self, position_ids: torch.Tensor | None, past_length: int, new_tokens: int) -> torch.Tensor:
        """Positions for a step that adds ``new_tokens`` to a cache of ``past_length``.

        ``position_ids`` are the caller's, counted on the full-length sequence; without them a
        decoder counts from the cache length, which on the full sequence would have been
        ``past_length - L' + L``. Either way, they move back by :attr:`shift`.
        """
        shift = self.shift.to(self.attention_mask.device).unsqueeze(1)
        if position_ids is None:
            start = past_length - self.attention_mask.shape[1] + self.length
            steps = torch.arange(start, start + new_tokens, device=shift.device)
            return steps.expand(shift.shape[0], -1) - shift
        return position_ids - shift.to(position_ids.device)


@dataclass
class CompactedSequence:
    """A batch with some tokens removed, each row's kept tokens right-aligned (left padding).

    Attributes:
        keep: (B, L) bool, the tokens that made it into the compacted batch (the caller's keep
            without the input's padding).
        source: (B, L') long, the input column of each compacted one (0 where it is padding).
        is_pad: (B, L') bool, the padding added on the left of each compacted row.
        input_ids, inputs_embeds, labels: compacted counterparts of the inputs (None if not given).
        attention_mask: (B, L') mask; None only when nothing needs one (no mask given, no row
            padded, positions compacted).
        position_ids: (B, L') positions of the kept tokens (see :func:`compact`); None only when
            neither a mask nor positions were given and no row needed padding (the model's own
            0..L'-1 are then right).
        prefix: what decode steps after this prefill need, see :class:`CompactedPrefix`.
        others: compacted counterparts of the ``others`` given, by name.
    """

    keep: torch.Tensor
    source: torch.Tensor
    is_pad: torch.Tensor
    input_ids: torch.Tensor | None
    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None
    prefix: CompactedPrefix
    others: dict[str, torch.Tensor] = field(default_factory=dict)

    def gather(self, values: torch.Tensor | None, fill: float = 0) -> torch.Tensor | None:
        """The compacted counterpart of any (B, L, ...) tensor (new padding gets ``fill``)."""
        return _gather(values, self.source, self.is_pad, self.keep.shape[1], fill)


def _gather(
    values: torch.Tensor | None, source: torch.Tensor, is_pad: torch.Tensor, length: int, fill: float
) -> torch.Tensor | None:
    if values is None:
        return None
    batch, new_length = source.shape
    if values.shape[:2] != (batch, length):
        raise ValueError(f"tensors to compact must start with (B, L) = {(batch, length)}; got {tuple(values.shape)}")
    trailing = values.shape[2:]
    shape = (batch, new_length, *([1] * len(trailing)))
    index = source.to(values.device).view(shape).expand(-1, -1, *trailing)
    out = torch.gather(values, 1, index)
    return out.masked_fill(is_pad.to(values.device).view(shape), fill)


def compact(
    keep: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    others: dict[str, torch.Tensor] | None = None,
    pad_token_id: int = 0,
    positions: str = "compacted",
) -> CompactedSequence:
    """Remove the tokens where ``keep`` is False, and padding, and left-pad the rows to a common length.

    Args:
        keep: (B, L) bool; every row must keep at least one token that is not padding.
        input_ids: (B, L) token ids; new padding gets ``pad_token_id``.
        inputs_embeds: (B, L, D) embeddings; new padding gets zeros.
        attention_mask: (B, L) 2D padding mask (1 = attend); its 0 columns are dropped, and new
            padding gets 0.
        position_ids: (B, L) positions; default 0..L-1, as a decoder assigns without a cache.
        labels: (B, L) targets; new padding gets -100.
        others: further (B, L, ...) tensors that run along the sequence, by name; new padding
            gets 0. Returned in ``others`` under the same names.
        positions: "compacted": a kept token's position drops by the number of real tokens
            removed before it, so the language model sees the short sequence as if it had been
            the prompt (text after a pruned image does not keep the image's positions).
            "original": kept tokens keep their positions, gaps included; a mask is then always
            returned, since transformers reads gapped positions without one as packed sequences.

    Kept tokens keep their order. Removed padding never moves a position: a left-padded row's
    positions already skip its padding.
    """
    if keep.ndim != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a (B, L) bool tensor; got dtype {keep.dtype}, shape {tuple(keep.shape)}")
    check_positions(positions)
    batch, length = keep.shape
    real = torch.ones_like(keep) if attention_mask is None else attention_mask.to(keep.device) != 0
    if real.shape != keep.shape:
        raise ValueError(f"attention_mask must be (B, L) = {(batch, length)}; got {tuple(attention_mask.shape)}")
    keep = keep & real
    counts = keep.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("keep must keep at least one token that is not padding in every row")
    new_length = int(counts.max())
    padded = bool((counts != new_length).any())

    # Column of each kept token in the output: rows are right-aligned.
    target = keep.long().cumsum(dim=1) - 1 + (new_length - counts).unsqueeze(1)
    rows, cols = keep.nonzero(as_tuple=True)
    source = torch.full((batch, new_length), -1, dtype=torch.long, device=keep.device)
    source[rows, target[rows, cols]] = cols
    is_pad = source < 0
    source.clamp_(min=0)
    removed = real & ~keep
    gapped = positions == "original" and bool(removed.any())

    new_mask = _gather(attention_mask if attention_mask is not None else real.long(), source, is_pad, length, 0)
    needs_mask = attention_mask is not None or padded or gapped

    new_positions = None
    if needs_mask or position_ids is not None:
        if position_ids is not None and position_ids.shape != (batch, length):
            raise ValueError(f"position_ids must be (B, L) = {(batch, length)}; got shape {tuple(position_ids.shape)}")
        base = position_ids
        if base is None:
            base = torch.arange(length, device=keep.device).expand(batch, length)
        if positions == "compacted":
            base = base - removed.long().cumsum(dim=1).to(base.device)
        new_positions = _gather(base, source, is_pad, length, 0)

    shift = removed.sum(dim=1) if positions == "compacted" else torch.zeros_like(counts)
    return CompactedSequence(
        keep=keep,
        source=source,
        is_pad=is_pad,
        input_ids=_gather(input_ids, source, is_pad, length, pad_token_id),
        inputs_embeds=_gather(inputs_embeds, source, is_pad, length, 0.0),
        attention_mask=new_mask if needs_mask else None,
        position_ids=new_positions,
        labels=_gather(labels, source, is_pad, length, IGNORE_INDEX),
        prefix=CompactedPrefix(length=length, attention_mask=new_mask, shift=shift),
        others={name: _gather(values, source, is_pad, length, 0) for name, values in (others or {}).items()},
    )
