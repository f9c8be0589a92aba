"""The [CLS] attention row and the keys of one vision-transformer layer, whatever attention backend runs.

The row is taken from the query and key projections the layer computes anyway
(:mod:`.attention_row`): only the [CLS] query is scored.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention_row import ProjectionCapture, head_averaged_row


class ClsAttentionCapture(ProjectionCapture):
    """Within a ``with`` block, records the [CLS]-to-patch attention of ``attention`` (and its keys).

    ``attention`` is a CLIP-style self-attention module with ``q_proj`` and ``k_proj`` linear
    layers, ``num_heads``, ``head_dim`` and ``scale``, whose sequence starts with [CLS].

    After the vision tower ran inside the block:
        ``scores()``: (B, N) float32 attention of [CLS] to the N patches, averaged over heads
        (softmax over [CLS] and the patches, as the layer computes it).
        ``keys()``: (B, N, H, d) the patches' keys per head (only if ``keep_keys``).
    """

    def __init__(self, attention: nn.Module, keep_keys: bool, projections: tuple[str, str] = ("q_proj", "k_proj")) -> None:
        super().__init__(attention, projections)
        self._keep_keys = keep_keys
        self._scores: torch.Tensor | None = None
        self._patch_keys: torch.Tensor | None = None

    def _row(self, query: torch.Tensor) -> torch.Tensor:
        return query[:, 0]

    def _score(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        heads, width = self.attention.num_heads, self.attention.head_dim
        per_head = keys.unflatten(-1, (heads, width))
        scores = head_averaged_row(query.view(-1, heads, width), per_head.transpose(1, 2), self.attention.scale)
        self._scores = scores[:, 1:]
        self._patch_keys = per_head[:, 1:] if self._keep_keys else None

    def scores(self) -> torch.Tensor:
        if self._scores is None:
            raise RuntimeError("the vision layer whose [CLS] attention was to be captured did not run")
        return self._scores

    def keys(self) -> torch.Tensor | None:
        self.scores()
        return self._patch_keys
