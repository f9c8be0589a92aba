"""The attention each token receives in a layer of vLLM's vision towers without [CLS] (Qwen-VL, SigLIP).

vLLM's ``Qwen2_5_VisionAttention`` (in Qwen2.5-VL's and Qwen3-VL's towers) hands its rotated
queries and keys to ``MMEncoderAttention``, a fused kernel that never returns weights. A forward
pre-hook on that kernel module takes the queries and keys it is given (after the rotary
embedding, as the library's transformers hook rebuilds them) and keeps only what the method
needs: the mean attention each patch receives from its image
(:func:`~vispruner.adapters.attention_received.mean_attention_received`, chunked, no (S x S)
matrix held), averaged over each merge group, and the group-averaged keys for VisionZip.
Everything else (features, projection, replacement, window order) is the library's
:class:`~vispruner.adapters.qwen_vision.MergerTap`. With tensor parallelism each rank holds some
heads: the head sums are added over ranks.

vLLM's ``SiglipAttention`` (LLaVA-OneVision's and Gemma 3's towers) computes queries and keys in one fused
``qkv_proj``: :class:`QkvReceivedCapture` scores them from that projection's output, as the
library's :class:`~vispruner.adapters.siglip.ReceivedAttentionCapture` does from ``q_proj`` and
``k_proj``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapters.attention_received import mean_attention_received
from ..adapters.qwen_vision import MergerTap
from ..adapters.siglip import ReceivedAttentionCapture
from .cls_row import query_and_keys


class KernelInputTap(MergerTap):
    """:class:`MergerTap` whose signal comes from the inputs of the last block's attention kernel.

    ``attention``: the block's ``Qwen2_5_VisionAttention``; ``segments``: cumulative boundaries of
    the images in the tower's sequence (the last block attends over whole images).
    """

    def __init__(
        self, merger: nn.Module, attention: nn.Module | None, unit: int, order: torch.Tensor | None, keep_keys: bool,
        segments: torch.Tensor,
    ) -> None:
        super().__init__(merger, attention, unit, order, keep_keys, rows=unit)
        self._bounds = segments

    def __enter__(self) -> "KernelInputTap":
        if self._attention is not None:
            self._handles = [self._attention.attn.register_forward_pre_hook(self._on_kernel, with_kwargs=True)]
        return self

    def _on_kernel(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        attention = self._attention
        query, key = (kwargs["query"], kwargs["key"]) if "query" in kwargs else args[:2]
        local = attention.num_attention_heads_per_partition
        with torch.no_grad():
            # (1, S, h, d) -> (h, S, d), this rank's heads.
            query, key = query.detach()[0].transpose(0, 1), key.detach()[0].transpose(0, 1)
            received = mean_attention_received(query, key, module.scale, segments=self._bounds.to(query.device)) * local
            grouped = key.transpose(0, 1).float().reshape(-1, self._unit, local, key.shape[-1]).mean(dim=1) if self._keep_keys else None
            if attention.tp_size > 1:
                from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce

                received = tensor_model_parallel_all_reduce(received)
                grouped = None if grouped is None else tensor_model_parallel_all_gather(grouped.contiguous(), dim=1)
            total = local * attention.tp_size
            self._scores = self._placeholder_order(received.view(-1, self._unit).mean(dim=1) / total)
            self._keys = None if grouped is None else self._placeholder_order(grouped)


class QkvReceivedCapture(ReceivedAttentionCapture):
    """:class:`ReceivedAttentionCapture` of vLLM's ``SiglipAttention``, from its fused ``qkv_proj``:
    ``scores()`` (crops, S), each patch's attention received from its crop averaged over all heads
    and queries; ``keys()`` (crops, S, H, d) or None unless ``keep_keys``."""

    def __enter__(self) -> "QkvReceivedCapture":
        self._handles = [self.attention.qkv_proj.register_forward_hook(self._on_qkv)]
        return self

    def _on_qkv(self, module: nn.Module, inputs: Any, output: Any) -> None:
        attention = self.attention
        local, width = attention.num_heads_per_partition, attention.head_dim
        with torch.no_grad():
            query, keys = query_and_keys(output)
            crops, length, _ = keys.shape

            def heads_first(values: torch.Tensor) -> torch.Tensor:  # (B, S, h*d) -> (h, B*S, d)
                return values.reshape(crops * length, local, width).transpose(0, 1)

            segments = torch.arange(0, crops * length + 1, length, device=keys.device)
            received = mean_attention_received(heads_first(query), heads_first(keys), attention.scale, segments)
            per_head = keys.unflatten(-1, (local, width)) if self._keep_keys else None
            if attention.tp_size > 1:
                from vllm.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce

                # This rank's mean over its heads, weighted by their count, summed over ranks.
                received = tensor_model_parallel_all_reduce(received * local) / attention.num_heads
                per_head = None if per_head is None else tensor_model_parallel_all_gather(per_head.contiguous(), dim=2)
            self._scores = received.view(crops, length)
            self._per_head_keys = per_head
