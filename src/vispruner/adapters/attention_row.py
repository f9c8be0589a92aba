"""One query's attention row in a layer, from the query and key projections the layer computes anyway.

SDPA and FlashAttention never materialise attention probabilities, and asking for all of them
(eager, ``output_attentions``) costs a (heads x L x L) matrix per layer. A pruning method needs
the row of one query per batch item: forward hooks on the layer's ``q_proj`` and ``k_proj`` keep
that query and the keys, and only that row is scored, so no projection is computed twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ProjectionCapture:
    """Within a ``with`` block, hands one query row per batch item and the keys of ``attention`` to
    :meth:`_score`, once per forward, as soon as both projections exist (whichever runs first).

    ``attention`` has ``q_proj`` and ``k_proj`` modules whose outputs are (B, L, heads * head size);
    ``projections`` names others to read instead, when the layer transforms those outputs before
    it attends (InternViT's ``q_norm`` and ``k_norm``, over the whole width).
    Subclasses say which query row to keep (:meth:`_row`) and what to make of it (:meth:`_score`).
    """

    def __init__(self, attention: nn.Module, projections: tuple[str, str] = ("q_proj", "k_proj")) -> None:
        self.attention = attention
        self._projections = projections
        self._query: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "ProjectionCapture":
        query, key = (getattr(self.attention, name) for name in self._projections)
        self._handles = [query.register_forward_hook(self._on_query), key.register_forward_hook(self._on_keys)]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _row(self, query: torch.Tensor) -> torch.Tensor:
        """(B, L, D) query projection -> (B, D) the row to score per batch item."""
        raise NotImplementedError

    def _score(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        """``query`` (B, D) from :meth:`_row`; ``keys`` (B, L, D') the whole key projection, detached."""
        raise NotImplementedError

    def _on_query(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # Copied: a view would keep the whole (B, L, D) projection alive.
        self._query = self._row(output.detach()).clone()
        self._pair()

    def _on_keys(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._keys = output.detach()
        self._pair()

    def _pair(self) -> None:
        # Scored as soon as both projections exist, so that the keys can be let go at once.
        if self._query is None or self._keys is None:
            return
        query, keys = self._query, self._keys
        self._query = self._keys = None
        with torch.no_grad():
            self._score(query, keys)


class RotaryCapture(ProjectionCapture):
    """A :class:`ProjectionCapture` of every query that also records the rotary ``(cos, sin)`` the
    attention module is called with (``position_embeddings``), so that :meth:`_score` can rotate
    the projections as the layer does (Pixtral, Gemma 4's encoder)."""

    def __init__(self, attention: nn.Module, projections: tuple[str, str] = ("q_proj", "k_proj")) -> None:
        super().__init__(attention, projections)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> "RotaryCapture":
        super().__enter__()
        self._handles.append(self.attention.register_forward_pre_hook(self._on_input, with_kwargs=True))
        return self

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._rotary = kwargs["position_embeddings"]

    def _row(self, query: torch.Tensor) -> torch.Tensor:
        return query  # every query counts


def head_averaged_row(
    query: torch.Tensor, keys: torch.Tensor, scale: float, visible: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of one query per batch item, averaged over heads, in float32.

    ``query`` (B, H, h); ``keys`` (B, K, L, h) with H a multiple of K: query head ``i`` reads key
    head ``i // (H // K)``, as grouped-query attention does; ``visible`` (B, L) bool, the keys the
    query may attend to (None: all). Returns (B, L).
    """
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    logits = torch.matmul(query.float().unsqueeze(2), keys.float().transpose(-1, -2)).squeeze(2) * scale
    if visible is not None:
        logits = logits.masked_fill(~visible.unsqueeze(1), -torch.inf)
    return logits.softmax(dim=-1).mean(dim=1)
