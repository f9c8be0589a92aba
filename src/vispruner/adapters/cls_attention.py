"""The [CLS] attention row and the keys of one vision-transformer layer, whatever attention backend runs.

SDPA and FlashAttention never materialise attention probabilities, and asking for all of them
(eager, ``output_attentions``) costs a (heads x N x N) matrix per layer. The row a pruning
method needs is one query against N keys: these hooks take the query and key projections the
layer computes anyway and score only the [CLS] query.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ClsAttentionCapture:
    """Within a ``with`` block, records the [CLS]-to-patch attention of ``attention`` (and its keys).

    ``attention`` is a CLIP-style self-attention module with ``q_proj`` and ``k_proj`` linear
    layers, ``num_heads``, ``head_dim`` and ``scale``, whose sequence starts with [CLS].

    After the vision tower ran inside the block:
        ``scores()``: (B, N) float32 attention of [CLS] to the N patches, averaged over heads
        (softmax over [CLS] and the patches, as the layer computes it).
        ``keys()``: (B, N, H, d) the patches' keys per head (only if ``keep_keys``).
    """

    def __init__(self, attention: nn.Module, keep_keys: bool) -> None:
        self._attention = attention
        self._keep_keys = keep_keys
        self._query: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._patch_keys: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "ClsAttentionCapture":
        self._handles = [
            self._attention.q_proj.register_forward_hook(self._on_query),
            self._attention.k_proj.register_forward_hook(self._on_keys),
        ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_query(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # Row 0 only, copied: a view would keep the whole (B, N+1, D) projection alive.
        self._query = output[:, 0].detach().clone()
        self._score()

    def _on_keys(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._keys = output.detach()
        self._score()

    def _score(self) -> None:
        # Scored as soon as both projections exist, so that the keys can be let go at once.
        if self._query is None or self._keys is None:
            return
        heads, width = self._attention.num_heads, self._attention.head_dim
        batch, tokens, _ = self._keys.shape
        query = self._query.float().view(batch, heads, 1, width)
        keys = self._keys.float().view(batch, tokens, heads, width).transpose(1, 2)
        logits = torch.matmul(query, keys.transpose(-1, -2)).squeeze(2) * self._attention.scale
        self._scores = logits.softmax(dim=-1).mean(dim=1)[:, 1:]
        self._patch_keys = self._keys[:, 1:].unflatten(-1, (heads, width)) if self._keep_keys else None
        self._query = self._keys = None

    def scores(self) -> torch.Tensor:
        if self._scores is None:
            raise RuntimeError("the vision layer whose [CLS] attention was to be captured did not run")
        return self._scores

    def keys(self) -> torch.Tensor | None:
        self.scores()
        return self._patch_keys
