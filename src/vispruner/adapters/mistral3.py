"""Mistral 3 (``Mistral3ForConditionalGeneration``, Mistral Small 3.x): a Pixtral tower, 2 x 2 patch merger.

Pixtral takes each image at its own resolution: all images' patches run as one sequence with a
block-diagonal mask and 2D rotary positions. The projector normalises the patches, and its patch
merger concatenates each 2 x 2 group (``unfold``) and projects it to one token. In the prompt an
image is its merged rows, each ended by ``[IMG_BREAK]``, the last by ``[IMG_END]``; those stay.
The axes of docs/families:

* signal: the attention each patch receives from its image's patches at the feature layer
  (``vision_feature_layer``, one int), with the layer's own rotary embedding, averaged over heads
  and queries, then over each merge group by the merger's own ``unfold``;
* diversity features: the merging layer's input (4 normalised patch rows concatenated);
* unit: an image (one piece; both budgets are the same);
* order and packing: each image's merged grid in raster order, images in order;
* positions: 1D, compacted (or original);
* other streams: labels only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Mistral3ForConditionalGeneration

from .attention_received import mean_attention_received
from .attention_row import RotaryCapture
from .clip_projector import feature_attention
from .vision_stage import Family, Item, Modality

IMAGE = Modality(
    name="image", encoder="get_image_features", pixels="pixel_values", token_id="image_token_id",
    arguments=("image_sizes", "vision_feature_layer"),
)


class PixtralVision:
    """:class:`~.vision_stage.VisionSide` of one Mistral 3 model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = model.model.vision_tower.transformer.layers
        attention = getattr(self.layers[0], "attention", None)
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "head_dim", "scaling")):
            raise TypeError(f"vision tower {type(model.model.vision_tower).__name__} is not the stock Pixtral tower")
        self.merge = model.config.spatial_merge_size
        self.patch = model.config.vision_config.patch_size

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        return [Item(1, grid) for grid in self.grids(arguments)]

    def grids(self, arguments: dict[str, Any]) -> list[tuple[int, int]]:
        """Per image, its (rows, cols) of merged tokens, as the merger's ``unfold`` leaves them."""
        step = self.patch * self.merge
        return [(int(h) // step, int(w) // step) for h, w in _sizes(arguments)]

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> "MergingTap":
        attention = feature_attention(self.model, self.layers, arguments, None, attribute="attention")
        attention = attention if needs & {"attention", "keys"} else None
        patches = [(int(h) // self.patch, int(w) // self.patch) for h, w in _sizes(arguments)]
        return MergingTap(self.model, attention, patches, self.merge, keep_keys="keys" in needs)

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        return [keep[0] for keep in keeps]


def _sizes(arguments: dict[str, Any]) -> list[tuple[int, int]]:
    sizes = arguments.get("image_sizes")
    if sizes is None:
        raise ValueError("get_image_features needs image_sizes to prune")
    return [tuple(size) for size in torch.as_tensor(sizes).tolist()]


class RotaryReceived(RotaryCapture):
    """Within a ``with`` block, records the attention each patch receives from its own image's
    patches in a Pixtral layer (rotary embedding applied as the layer applies it), and its keys.

    After the layer ran: ``scores`` (L,) float32 over all images' patches, ``keys`` (L, H, d)
    float32 (None unless ``keep_keys``).
    """

    def __init__(self, attention: nn.Module, sizes: list[int], keep_keys: bool) -> None:
        super().__init__(attention)
        self._sizes = sizes
        self._keep_keys = keep_keys
        self.scores: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def _score(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        attention = self.attention
        heads = attention.num_heads
        query = query[0].view(-1, heads, attention.head_dim).transpose(0, 1)  # (H, L, d): one sequence
        keys = keys[0].view(-1, heads, attention.head_dim).transpose(0, 1)
        rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        query, keys = rotate(query, keys, *self._rotary, unsqueeze_dim=0)
        segments = torch.tensor([0, *self._sizes]).cumsum(0)
        self.scores = mean_attention_received(query, keys, attention.scaling, segments)
        self.keys = keys.transpose(0, 1).float() if self._keep_keys else None


class MergingTap:
    """The feature layer's received attention (and keys) per patch, averaged over each merge group;
    the merging layer's (T, 4D) input as features."""

    def __init__(
        self, model: nn.Module, attention: nn.Module | None, patches: list[tuple[int, int]], merge: int, keep_keys: bool
    ) -> None:
        self._projector = model.model.multi_modal_projector
        self.module = self._projector.patch_merger.merging_layer
        self._patches = patches
        self._merge = merge
        sizes = [rows * cols for rows, cols in patches]
        self._capture = None if attention is None else RotaryReceived(attention, sizes, keep_keys)

    def __enter__(self) -> "MergingTap":
        if self._capture is not None:
            self._capture.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._capture is not None:
            self._capture.__exit__(*exc_info)

    def _merged(self, values: torch.Tensor) -> torch.Tensor:
        """(L, K) per patch of all images -> (T, K): each merge group's mean, grouped by ``unfold``
        as the merger groups the features."""
        merged = []
        for (rows, cols), image in zip(self._patches, values.split([h * w for h, w in self._patches])):
            groups = F.unfold(image.t().reshape(1, -1, rows, cols), kernel_size=self._merge, stride=self._merge)
            merged.append(groups.view(image.shape[1], self._merge**2, -1).mean(dim=1).t())
        return torch.cat(merged)

    def _captured(self) -> RotaryReceived | None:
        if self._capture is not None and self._capture.scores is None:
            raise RuntimeError("the vision tower's feature layer did not run inside the feature call")
        return self._capture

    def features(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return inputs[0]

    def attention(self) -> torch.Tensor | None:
        capture = self._captured()
        return None if capture is None else self._merged(capture.scores.unsqueeze(-1))[:, 0]

    def keys(self) -> torch.Tensor | None:
        capture = self._captured()
        if capture is None or capture.keys is None:
            return None
        return self._merged(capture.keys.flatten(1)).unflatten(-1, capture.keys.shape[1:])

    def project(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # forward, not __call__: the pre-hook must not fire again for its own projection.
        projector = self._projector
        return projector.linear_2(projector.act(projector.linear_1(self.module.forward(inputs[0]))))

    def substitute(self, inputs: tuple[torch.Tensor, ...], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (features.view_as(inputs[0]),)


FAMILY = Family(
    name="Mistral 3",
    model_class=Mistral3ForConditionalGeneration,
    example="mistralai/Mistral-Small-3.1-24B-Instruct-2503",
    vision=PixtralVision,
    modalities=(IMAGE,),
)
