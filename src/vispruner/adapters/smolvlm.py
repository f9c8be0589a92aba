"""SmolVLM / Idefics3 (``SmolVLMForConditionalGeneration``, ``Idefics3ForConditionalGeneration``):
SigLIP tiles, pixel-shuffled by the connector.

The processor splits an image into 512 px tiles plus a global image, and a video into frames;
the model gets all of a prompt's tiles (padded with all-zero tiles to the batch's longest), and
each tile's placeholders follow its own text header (``<fake_token_around_image><row_i_col_j>``,
``<global-img>``), which stays. The axes of docs/families:

* signal: the attention each patch receives in the tower's last layer (whose normalised output is
  the feature), averaged over each s x s group by the connector's own ``pixel_shuffle``;
* diversity features: the input of the connector's projection, the shuffled features (s^2 patch
  rows concatenated);
* unit: a tile (the global image is a tile; a video frame is a tile). The model is not told which
  tiles make an image, so ``budget="per_image"`` is refused;
* order and packing: each tile's tokens in raster order, tiles in batch order;
* positions: 1D, compacted (or original);
* other streams: labels only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from .pixel_shuffle import shuffled_mean
from .siglip import PooledTap
from .vision_stage import Family, Item, Modality

IMAGE = Modality(
    name="image", encoder="get_image_features", pixels="pixel_values", token_id="image_token_id",
    arguments=("pixel_attention_mask",),
)


class TileVision:
    """:class:`~.vision_stage.VisionSide` of one SmolVLM or Idefics3 model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = model.model.vision_model.encoder.layers
        attention = getattr(self.layers[-1], "self_attn", None)
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "head_dim", "scale")):
            raise TypeError(f"vision tower {type(model.model.vision_model).__name__} is not the stock SigLIP tower")
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size // model.config.scale_factor
        self.grid = (side, side)

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        return [Item(1, self.grid)] * int(_real_tiles(arguments["pixel_values"]).sum())

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> "TileTap":
        mask = arguments.get("pixel_attention_mask")
        if mask is not None and not bool(mask.flatten(0, 1)[_real_tiles(arguments["pixel_values"])].all()):
            raise NotImplementedError(
                "pruning needs whole tiles (pixel_attention_mask all ones), as the processor makes them; "
                "got tiles padded inside"
            )
        attention = self.layers[-1].self_attn if needs & {"attention", "keys"} else None
        return TileTap(self.model, attention, "keys" in needs)

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        return [keep[0] for keep in keeps]


def _real_tiles(pixel_values: torch.Tensor) -> torch.Tensor:
    """(B * N,) bool: the tiles that are not all-zero padding, as the model tells them apart."""
    return (pixel_values.flatten(0, 1) != 0).flatten(1).any(dim=1)


class TileTap(PooledTap):
    """The choice is made at the connector's projection, on the shuffled (tiles, T, s^2 C) features."""

    def __init__(self, model: nn.Module, attention: nn.Module | None, keep_keys: bool) -> None:
        self.connector = model.model.connector
        super().__init__(model, attention, keep_keys, source=self.connector)
        self.module = self.connector.modality_projection

    def arrange(self, channels: torch.Tensor) -> torch.Tensor:
        return shuffled_mean(lambda values: self.connector.pixel_shuffle(values, self.connector.scale_factor), channels)

    def features(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        return inputs[0].flatten(0, 1)

    def project(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        return self.module.forward(inputs[0]).flatten(0, 1)

    def substitute(self, inputs: tuple[Any, ...], features: torch.Tensor) -> tuple[Any, ...]:
        return (features.view_as(inputs[0]),)


FAMILY = Family(
    name="SmolVLM / Idefics3",
    model_class=(SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration),
    example="HuggingFaceTB/SmolVLM2-2.2B-Instruct",
    vision=TileVision,
    modalities=(IMAGE,),
    per_image="the model receives its tiles as one flat batch, without which image each tile is of",
)
