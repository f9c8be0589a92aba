"""The vision side and the positions of Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5).

The tower has no [CLS] token, and a merger fuses each 2 x 2 group of patches into one language-model
token; pruning chooses among the merged tokens, in the order of their placeholders (per image or
video: temporal group, then rows, then columns of the merged grid).

* Importance: the mean attention each patch receives from the patches it attends to in the
  tower's last block (its image or temporal group for a full-attention block), averaged over
  heads and queries, then over the 4 patches of each merge group
  (:func:`~.attention_received.mean_attention_received`, chunked: images reach 16k patches). Hooks
  take the block's own query/key projection and rotary embedding, so it works whatever attention
  backend runs.
* Features: the merger's input for each merged token, its 4 patch rows concatenated.
* Keys (VisionZip): the block's keys per head, averaged over the 4 patches of each merge group.
* Qwen2.5-VL runs its blocks in window order (merge groups permuted window by window); the
  signal and features are put back in placeholder order with ``argsort(window_index)``, and
  replacement features go back to window order before the merger.
* Positions: 3D M-RoPE positions of the unpruned prompt (the model's own ``get_rope_index``),
  the kept columns gathered; ``rope_deltas`` stay those of the unpruned prompt, so decoding
  continues from the unpruned sequence's next position.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from torch import nn

from . import hf_seam
from .attention_received import mean_attention_received
from .sequence import CompactedPrefix
from .vision_stage import Item, Modality

IMAGE = Modality(
    name="image", encoder="get_image_features", pixels="pixel_values", token_id="image_token_id",
    arguments=("image_grid_thw",),
)
VIDEO = Modality(
    name="video", encoder="get_video_features", pixels="pixel_values_videos", token_id="video_token_id",
    arguments=("video_grid_thw",),
)
#: (B, L) forward arguments that run along the prompt besides ids, mask and labels.
STREAMS = ("mm_token_type_ids",)


class QwenVision:
    """:class:`~.vision_stage.VisionSide` of one Qwen-VL model."""

    #: Whether the tower fuses each merged token's patches before the merger (GLM-4.1V's 2 x 2
    #: conv: one merger input row per token) rather than in it (Qwen: 4 rows, concatenated).
    fused_before_merger = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.visual = model.model.visual
        blocks = getattr(self.visual, "blocks", None)
        attention = getattr(blocks[-1], "attn", None) if isinstance(blocks, nn.ModuleList) and len(blocks) else None
        if not all(hasattr(attention, name) for name in ("qkv", "num_heads", "scaling")) or not hasattr(
            self.visual, "merger"
        ):
            raise TypeError(
                f"vision tower {type(self.visual).__name__} is not a Qwen-VL tower (blocks with a fused qkv "
                "attention, then a merger); vispruner supports the stock Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and GLM-4.1V "
                "towers"
            )
        self.attention = attention
        self.merge = self.visual.spatial_merge_size

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        grids = _grids(modality, arguments)
        return [Item(t, (h // self.merge, w // self.merge)) for t, h, w in grids.tolist()]

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        return [keep.flatten() for keep in keeps]

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> "MergerTap":
        grids = _grids(modality, arguments)
        order = None
        if getattr(self.visual, "window_size", None) is not None and hasattr(self.visual, "fullatt_block_indexes"):
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grids, spatial_merge_size=self.merge, window_size=self.visual.window_size,
                patch_size=self.visual.patch_size,
            )
            order = torch.argsort(window_index)
        attention = self.attention if needs & {"attention", "keys"} else None
        rows = 1 if self.fused_before_merger else self.merge**2
        return MergerTap(self.visual.merger, attention, self.merge**2, order, keep_keys="keys" in needs, rows=rows)


class MergerTap:
    """Hooks on a Qwen-VL tower's last block (signal, keys) and its merger (features).

    Tensors in the block are in the tower's order, merge groups of ``unit`` patches contiguous;
    the merger's input has ``rows`` rows per merged token, in the same order; ``order`` (argsort
    of the window index) lists the groups in placeholder order, or None when the two orders agree.
    """

    def __init__(
        self, merger: nn.Module, attention: nn.Module | None, unit: int, order: torch.Tensor | None, keep_keys: bool,
        rows: int,
    ) -> None:
        self.module = merger
        self._attention = attention
        self._unit = unit
        self._rows = rows
        self._order = order
        self._keep_keys = keep_keys
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._segments: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> "MergerTap":
        if self._attention is not None:
            self._handles = [
                self._attention.register_forward_pre_hook(self._on_input, with_kwargs=True),
                self._attention.qkv.register_forward_hook(self._on_projection),
            ]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _on_input(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._rotary = kwargs.get("position_embeddings")
        self._segments = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]

    def _on_projection(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        attention = self._attention
        length = output.shape[0]
        with torch.no_grad():
            query, key, _ = output.detach().reshape(length, 3, attention.num_heads, -1).unbind(1)
            if self._rotary is not None:
                rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
                query, key = rotate(query, key, *self._rotary)
            received = mean_attention_received(
                query.transpose(0, 1), key.transpose(0, 1), attention.scaling, segments=self._segments
            )
            self._scores = self._placeholder_order(received.view(-1, self._unit).mean(dim=1))
            if self._keep_keys:
                grouped = key.float().view(-1, self._unit, *key.shape[1:]).mean(dim=1)
                self._keys = self._placeholder_order(grouped)

    def _placeholder_order(self, values: torch.Tensor) -> torch.Tensor:
        return values if self._order is None else values[self._order.to(values.device)]

    def features(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        merged = inputs[0].reshape(-1, self._rows * inputs[0].shape[-1])
        return self._placeholder_order(merged)

    def attention(self) -> torch.Tensor | None:
        if self._attention is not None and self._scores is None:
            raise RuntimeError("the vision tower's last block did not run inside the feature call")
        return self._scores

    def keys(self) -> torch.Tensor | None:
        return self._keys

    def project(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # forward, not __call__: the pre-hook must not fire again for its own projection.
        return self._placeholder_order(self.module.forward(*inputs))

    def substitute(self, inputs: tuple[torch.Tensor, ...], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._order is not None:
            tower_order = torch.empty_like(features)
            tower_order[self._order.to(features.device)] = features
            features = tower_order
        return (features.reshape(inputs[0].shape), *inputs[1:])


class RopePositions:
    """3D M-RoPE positions of the unpruned prompt, gathered; decoding continues after the unpruned prompt.

    Positions are (4, B, L) as ``generate()`` builds them: row 0 the text positions (which the
    language model reads only to build its mask, compacted like 1D positions), rows 1-3 the
    temporal, height and width positions (kept as they are).
    """

    def prefill(self, model: nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        if arguments.get("input_ids") is None:
            # Without ids the stock model falls back on 1D positions or a stale rope_deltas.
            raise ValueError(
                "pruning a Qwen-VL prompt needs input_ids (its 3D positions are computed from them); "
                "got inputs_embeds only"
            )
        given = arguments.get("position_ids")
        if given is not None:
            if given.ndim == 3 and given.shape[0] == 4:
                return given
            if given.ndim == 3 and given.shape[0] == 3:
                return torch.cat([_text_positions(arguments, given.shape[1:]).unsqueeze(0), given])
            raise NotImplementedError(
                "with pruning, position_ids must be the 3D M-RoPE positions ((3, B, L), or (4, B, L) with the text "
                f"positions first) or None; got shape {tuple(given.shape)}"
            )
        inner = model.model
        accepted = inspect.signature(inner.compute_3d_position_ids).parameters
        call = {name: arguments.get(name) for name in accepted if name not in hf_seam.CACHE_NAMES}
        # No cache: the positions of the whole unpruned prompt (also sets rope_deltas).
        positions = hf_seam.call_with_cache(inner.compute_3d_position_ids, None, **call)
        if positions is None:
            raise ValueError(
                "pruning a Qwen-VL prompt needs mm_token_type_ids (as the processor returns them) to compute "
                "the 3D positions of the unpruned prompt"
            )
        return torch.cat([_text_positions(arguments, positions.shape[1:]).unsqueeze(0).to(positions), positions])

    def step(
        self, model: nn.Module, arguments: dict[str, Any], prefix: CompactedPrefix, past: int, new: int
    ) -> torch.Tensor | None:
        given = arguments.get("position_ids")
        if given is not None:
            return given
        deltas = model.model.rope_deltas
        if deltas is None:
            return None
        mask = arguments.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            text = (mask.long().cumsum(-1) - 1)[:, -new:]
        else:
            start = past - prefix.attention_mask.shape[1] + prefix.length
            batch = prefix.attention_mask.shape[0]
            text = torch.arange(start, start + new, device=deltas.device).expand(batch, -1)
        deltas = deltas.repeat_interleave(text.shape[0] // deltas.shape[0], dim=0).to(text.device)
        return (text + deltas).unsqueeze(0).expand(3, -1, -1)


def _text_positions(arguments: dict[str, Any], shape: torch.Size) -> torch.Tensor:
    """(B, L) positions counting each row's real tokens, as generate() builds row 0."""
    mask = arguments.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return torch.arange(shape[1]).expand(*shape)


def _grids(modality: Modality, arguments: dict[str, Any]) -> torch.Tensor:
    (name,) = modality.arguments
    grids = arguments.get(name)
    if grids is None:
        raise ValueError(f"{modality.encoder} needs {name} to prune")
    return grids
