"""The vision side of models with a SigLIP tower (no [CLS] token) whose tokens are pooled or packed.

Gemma 3 averages 4 x 4 patches into one token; LLaVA-OneVision pools video frames and packs
anyres images (unpadding, downsampling, newlines). The method must choose among the tokens the
language model receives, so everything it reads is pooled or packed exactly as those tokens are,
by the model's own code:

* the importance signal: the attention each patch receives from the patches of its crop at the
  vision layer that feeds the projector (:func:`~.attention_received.mean_attention_received`
  from that layer's query and key projections, whatever ``attn_implementation``);
* the diversity features: the projector's input; and the keys, for methods that merge by them.

:class:`PooledTap` captures them per patch, stacks them as channels of one tensor, and lets a
family arrange that tensor (pool, pack) into the selection's token order. A family names the
module whose forward pre-hook sees the tokens (Gemma 3: the projector's norm after its pooling;
OneVision: an identity inserted after the model's own pooling or packing).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from .attention_received import mean_attention_received
from .attention_row import ProjectionCapture
from .patching import InstancePatch


class ReceivedAttentionCapture(ProjectionCapture):
    """Within a ``with`` block, records the attention each patch of a SigLIP layer receives (and its keys).

    ``attention`` has ``q_proj`` and ``k_proj`` modules, ``num_heads``, ``head_dim`` and ``scale``,
    and attends without a mask within each crop of its (B, S, D) batch.

    After the layer ran: ``scores()`` (B, S) float32, each patch's attention received, averaged
    over heads and over the S queries of its crop; ``keys()`` (B, S, H, d), or None unless
    ``keep_keys``.
    """

    def __init__(self, attention: nn.Module, keep_keys: bool) -> None:
        super().__init__(attention)
        self._keep_keys = keep_keys
        self._scores: torch.Tensor | None = None
        self._per_head_keys: torch.Tensor | None = None

    def _row(self, query: torch.Tensor) -> torch.Tensor:
        return query  # every query counts

    def _score(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        crops, length, _ = keys.shape
        heads, width = self.attention.num_heads, self.attention.head_dim

        def one_sequence(values: torch.Tensor) -> torch.Tensor:  # (B, S, H*d) -> (H, B*S, d)
            return values.reshape(crops * length, heads, width).transpose(0, 1)

        segments = torch.arange(0, crops * length + 1, length)
        received = mean_attention_received(one_sequence(query), one_sequence(keys), self.attention.scale, segments)
        self._scores = received.view(crops, length)
        self._per_head_keys = keys.unflatten(-1, (heads, width)) if self._keep_keys else None

    def scores(self) -> torch.Tensor:
        if self._scores is None:
            raise RuntimeError("the vision layer whose received attention was to be captured did not run")
        return self._scores

    def keys(self) -> torch.Tensor | None:
        self.scores()
        return self._per_head_keys


class PooledTap:
    """A :class:`~.vision_stage.Tap` for one feature call of a SigLIP model with pooled or packed tokens.

    Subclasses set :attr:`module` and implement :meth:`arrange`, :meth:`project` and
    :meth:`substitute`. The projector's input, and at ``attention`` (the feature layer's
    self-attention, None when the method needs neither) the received attention and keys, are
    recorded per patch while the tower runs.
    """

    module: nn.Module

    def __init__(
        self, model: nn.Module, attention: nn.Module | None, keep_keys: bool, source: nn.Module | None = None
    ) -> None:
        self.model = model
        #: The module whose input is the per-patch features (default: the multimodal projector).
        self._source = model.model.multi_modal_projector if source is None else source
        self._attention = attention
        self._keep_keys = keep_keys
        self._capture: ReceivedAttentionCapture | None = None
        self._inputs: torch.Tensor | None = None
        self._arranged: torch.Tensor | None = None
        self._stack = ExitStack()
        self.patch = InstancePatch()

    def __enter__(self) -> "PooledTap":
        if self._attention is not None:
            self._capture = self._stack.enter_context(ReceivedAttentionCapture(self._attention, self._keep_keys))
        handle = self._source.register_forward_pre_hook(self._on_projector)
        self._stack.callback(handle.remove)
        self._stack.callback(self.patch.restore)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _on_projector(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._inputs = inputs[0].detach()

    def arrange(self, channels: torch.Tensor) -> torch.Tensor:
        """(n, N, K) per-patch channels of all crops or frames -> (T, K) in the selection's token
        order, pooled or packed as the language model's tokens are."""
        raise NotImplementedError

    def project(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        """(T, D) the language model's tokens, from :attr:`module`'s inputs."""
        raise NotImplementedError

    def substitute(self, inputs: tuple[Any, ...], features: torch.Tensor) -> tuple[Any, ...]:
        """:attr:`module`'s inputs with the tokens of (T, C) ``features`` where they differ from
        :meth:`features` (a merging method's merged tokens)."""
        raise NotImplementedError

    def features(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        return self._channels()[:, : self._width()].to(self._inputs.dtype)

    def attention(self) -> torch.Tensor | None:
        return None if self._capture is None else self._channels()[:, -1]

    def keys(self) -> torch.Tensor | None:
        keys = None if self._capture is None else self._capture.keys()
        if keys is None:
            return None
        return self._channels()[:, self._width() : -1].unflatten(-1, keys.shape[-2:]).to(keys.dtype)

    def _width(self) -> int:
        return self._inputs.shape[-1]

    def _channels(self) -> torch.Tensor:
        """(T, C [+ H*d] [+ 1]): features, keys and received attention, arranged."""
        if self._arranged is None:
            if self._inputs is None:
                raise RuntimeError("the multimodal projector did not run before the tokens were chosen")
            parts = [self._inputs.float()]
            if self._capture is not None:
                keys = self._capture.keys()
                if keys is not None:
                    parts.append(keys.flatten(2).float())
                parts.append(self._capture.scores().unsqueeze(-1))
            self._arranged = self.arrange(torch.cat(parts, dim=-1))
        return self._arranged


def changed_rows(tap: PooledTap, inputs: tuple[Any, ...], features: torch.Tensor) -> torch.Tensor:
    """(T,) bool: the tokens whose ``features`` differ from the tap's own (merged by the method)."""
    return (features != tap.features(inputs)).any(dim=-1)


def substitute_changed(tap: PooledTap, inputs: tuple[Any, ...], features: torch.Tensor) -> tuple[Any, ...]:
    """``tap.module``'s inputs with the rows of (T, C) ``features`` that differ from the tap's own
    (a merging method's merged tokens) put in place, in a copy with the input's strides: a norm's
    rounding depends on the memory layout, and unmerged tokens must stay bit for bit."""
    changed = changed_rows(tap, inputs, features)
    merged = inputs[0].clone()
    merged[changed.view(inputs[0].shape[:-1])] = features[changed].to(merged.dtype)
    return (merged, *inputs[1:])
