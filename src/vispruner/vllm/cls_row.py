"""The [CLS] attention row of one layer of vLLM's CLIP tower, without attention weights.

vLLM's ``CLIPAttention`` computes the query, key and value projections in one ``qkv_proj`` and
hands them to a fused kernel that never returns weights. A forward hook on ``qkv_proj`` keeps the
[CLS] query and the keys and scores only that row (:func:`~vispruner.adapters.attention_row.head_averaged_row`,
as the library's transformers hook does), so nothing is computed twice and no (L x L) matrix is
built. With tensor parallelism each rank holds some heads: the row is summed over ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters.attention_row import head_averaged_row
from ..adapters.cls_attention import ClsAttentionCapture


class QkvClsCapture(ClsAttentionCapture):
    """Within a ``with`` block, records the [CLS]-to-patch attention of vLLM's ``attention``
    (``scores()`` and ``keys()`` as :class:`~vispruner.adapters.cls_attention.ClsAttentionCapture`
    gives them, over all heads), from its fused ``qkv_proj``."""

    _handle: Any = None

    def __enter__(self) -> "QkvClsCapture":
        self._handle = self.attention.qkv_proj.register_forward_hook(self._on_qkv)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()

    def _on_qkv(self, module: nn.Module, inputs: Any, output: Any) -> None:
        attention = self.attention
        local_heads, width = attention.num_heads_per_partition, attention.head_dim
        with torch.no_grad():
            query, keys = query_and_keys(output)
            per_head = keys.unflatten(-1, (local_heads, width))  # (B, L, h, d)
            query = query[:, 0].view(-1, local_heads, width)
            # Mean over this rank's heads, weighted by their count, summed over ranks below.
            scores = head_averaged_row(query, per_head.transpose(1, 2), attention.scale) * local_heads
            if attention.tp_size > 1:
                from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce

                scores = tensor_model_parallel_all_reduce(scores)
                per_head = tensor_model_parallel_all_gather(per_head.contiguous(), dim=2) if self._keep_keys else None
            self._scores = (scores / attention.num_heads)[:, 1:]
            self._patch_keys = per_head[:, 1:] if self._keep_keys else None


def query_and_keys(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, L, h * d) query and key projections, detached, out of vLLM's fused ``qkv_proj``."""
    qkv = output[0] if isinstance(output, tuple) else output  # vLLM linears return (out, bias)
    query, keys, _ = qkv.detach().chunk(3, dim=-1)
    return query, keys
