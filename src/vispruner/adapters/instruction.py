"""The instruction a prompt row gives its images, for methods that select by it (CDPruner).

What counts as the instruction: every token of the image's prompt row that the model attends to
(attention mask 1), other than the image and video placeholders and the special tokens the
model's config names (``*_token_id`` / ``*_token_index``: image, video, vision start and end,
begin and end of image, padding, ...). That is the question and the chat template's words around
it, in every turn of the row, whether they stand before or after the image; every image of a row
gets its row's instruction. Each token is one row of the instruction's embeddings, taken from the
language model's input embedding table.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def marker_ids(config: Any) -> set[int]:
    """The special token ids a VLM config names at its top level."""
    ids = set()
    for name, value in vars(config).items():
        if (name.endswith("_token_id") or name.endswith("_token_index")) and isinstance(value, int):
            ids.add(value)
    return ids


def instruction_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, placeholders: list[int],
    items_per_row: list[int],
) -> list[torch.Tensor]:
    """Per item, (M, D) input embeddings of its row's instruction (module docstring).

    ``items_per_row`` says how many items (images, videos) each row of ``input_ids`` holds, in
    order. A row without instruction tokens gives one zero row: relevance is then the same for
    every token, and the selection is diversity alone.
    """
    text = torch.ones_like(input_ids, dtype=torch.bool)
    for token in marker_ids(model.config) | set(placeholders):
        text &= input_ids != token
    if attention_mask is not None and attention_mask.ndim == 2:
        text &= attention_mask.to(text.device).bool()
    table = model.get_input_embeddings()
    result = []
    for row, count in enumerate(items_per_row):
        if count == 0:
            continue
        ids = input_ids[row][text[row]]
        with torch.no_grad():
            embeds = table(ids) if ids.numel() else torch.zeros(1, table.weight.shape[1], dtype=table.weight.dtype, device=ids.device)
        result += [embeds] * count
    return result


def items_per_row(is_item: torch.Tensor, sizes: list[int]) -> list[int] | None:
    """How many consecutive items of ``sizes`` placeholder tokens each row of ``is_item`` (B, L)
    holds, or None when the items do not fill the rows' placeholders exactly."""
    counts, pointer = [], 0
    for found in is_item.sum(dim=1).tolist():
        taken = 0
        while found > 0 and pointer < len(sizes):
            found -= sizes[pointer]
            pointer += 1
            taken += 1
        if found != 0:
            return None
        counts.append(taken)
    return counts if pointer == len(sizes) else None
