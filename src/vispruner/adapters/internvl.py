"""InternVL 3 / 3.5 (``InternVLForConditionalGeneration``): InternViT tiles, pixel-shuffled 2 x 2.

The processor cuts an image into 448 px tiles (plus a thumbnail of the whole image) and a video
into frames, and gives the model all of them as one flat batch of tiles, each followed in the
prompt by its 256 placeholders (``<img>`` and ``</img>`` around an image's tiles stay, as text).
The axes of docs/families:

* signal: the [CLS] row of the feature layer's attention (``vision_feature_layer``, [CLS] dropped
  by ``vision_feature_select_strategy="default"``), read after the layer's ``q_norm`` / ``k_norm``
  (identities unless ``use_qk_norm``), then averaged over each 2 x 2 group by the model's own
  ``pixel_shuffle``, as the features are grouped;
* diversity features: the projector's input, the shuffled features (4 patch rows concatenated);
* unit: a tile (the thumbnail is a tile); a video frame is a tile. The model is not told which
  tiles make an image, so ``budget="per_image"`` is refused;
* order and packing: each tile's 16 x 16 tokens in raster order, tiles in batch order;
* positions: 1D, compacted (or original);
* other streams: labels only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import InternVLForConditionalGeneration

from .clip_projector import ProjectorTap, feature_attention
from .pixel_shuffle import shuffled_mean
from .vision_stage import Family, Item, Modality

IMAGE = Modality(
    name="image",
    encoder="get_image_features",
    pixels="pixel_values",
    token_id="image_token_id",
    arguments=("vision_feature_layer", "vision_feature_select_strategy"),
)
#: The layer's attention reads the normalised projections (identities without ``use_qk_norm``).
PROJECTIONS = ("q_norm", "k_norm")


class InternVLVision:
    """:class:`~.vision_stage.VisionSide` of one InternVL model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = model.model.vision_tower.encoder.layer
        attention = getattr(self.layers[0], "attention", None)
        if not all(hasattr(attention, name) for name in (*PROJECTIONS, "num_heads", "head_dim", "scale")):
            raise TypeError(f"vision tower {type(model.model.vision_tower).__name__} is not the stock InternViT")
        vision = model.config.vision_config
        side = int(vision.image_size[0] // vision.patch_size[0] * model.config.downsample_ratio)
        self.grid = (side, side)

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        return [Item(1, self.grid)] * arguments["pixel_values"].shape[0]

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> "InternVLTap":
        attention = feature_attention(self.model, self.layers, arguments, "default", attribute="attention")
        return InternVLTap(self.model, attention if needs & {"attention", "keys"} else None, "keys" in needs)

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        return [keep[0] for keep in keeps]


class InternVLTap(ProjectorTap):
    """The [CLS] row and keys of the feature layer, per patch, averaged over each shuffled group."""

    def __init__(self, model: nn.Module, attention: nn.Module | None, keep_keys: bool) -> None:
        super().__init__(model.model.multi_modal_projector, attention, keep_keys, PROJECTIONS)
        self._model = model

    def _shuffle(self, channels: torch.Tensor) -> torch.Tensor:
        count, patches, width = channels.shape
        side = int(patches**0.5)
        grid = channels.reshape(count, side, side, width)
        shuffled = self._model.model.pixel_shuffle(grid, scale_factor=self._model.config.downsample_ratio)
        return shuffled.reshape(count, -1, shuffled.shape[-1])

    def attention(self) -> torch.Tensor | None:
        return None if self._capture is None else shuffled_mean(self._shuffle, self._capture.scores())

    def keys(self) -> torch.Tensor | None:
        keys = None if self._capture is None else self._capture.keys()
        return None if keys is None else shuffled_mean(self._shuffle, keys)


FAMILY = Family(
    name="InternVL",
    model_class=InternVLForConditionalGeneration,
    example="OpenGVLab/InternVL3-8B-hf",
    vision=InternVLVision,
    modalities=(IMAGE,),
    per_image="the model receives its tiles as one flat batch, without which image each tile is of",
)
