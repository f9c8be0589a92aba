"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP tower whose patches are average-pooled.

At 896 px the tower gives 64 x 64 patches; the projector averages each 4 x 4 window (its own
``avg_pool``) into 256 tokens, then normalises and projects them. The importance signal is the
attention each patch receives in the tower's last layer (whose normalised output is the
feature), averaged over each window by that same ``avg_pool``; the diversity features are the
pooled features, the input of the projector's norm, where the method's choice is made. So the
method chooses among the 16 x 16 tokens the language model receives. The language model attends
bidirectionally among an image's tokens through ``token_type_ids``, compacted with the sequence.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Gemma3ForConditionalGeneration

from .clip_projector import encoder_layers
from .siglip import PooledTap, substitute_changed
from .vision_stage import Family, Item, Modality

IMAGE = Modality(name="image", encoder="get_image_features", pixels="pixel_values", token_id="image_token_id")


class GemmaVision:
    """:class:`~.vision_stage.VisionSide` of one Gemma 3 model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = encoder_layers(model.model.vision_tower)
        side = model.model.multi_modal_projector.tokens_per_side
        self.grid = (side, side)

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        return [Item(1, self.grid)] * arguments["pixel_values"].shape[0]

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> "GemmaTap":
        attention = self.layers[-1].self_attn if needs & {"attention", "keys"} else None
        return GemmaTap(self.model, attention, keep_keys="keys" in needs)

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        return [keep[0] for keep in keeps]


class GemmaTap(PooledTap):
    """The choice is made at the input of the projector's norm: the pooled (n, tokens, C) features."""

    def __init__(self, model: nn.Module, attention: nn.Module | None, keep_keys: bool) -> None:
        super().__init__(model, attention, keep_keys)
        self.projector = model.model.multi_modal_projector
        self.module = self.projector.mm_soft_emb_norm

    def arrange(self, channels: torch.Tensor) -> torch.Tensor:
        side = self.projector.patches_per_image
        grid = channels.transpose(1, 2).reshape(channels.shape[0], channels.shape[2], side, side)
        return self.projector.avg_pool(grid).flatten(2).transpose(1, 2).flatten(0, 1)

    def features(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        return inputs[0].flatten(0, 1)  # the model's own pooled features

    def project(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        # The projector's steps after the norm's input; forward, so that no hook fires again.
        normed = self.module.forward(inputs[0])
        return torch.matmul(normed, self.projector.mm_input_projection_weight).type_as(inputs[0]).flatten(0, 1)

    def substitute(self, inputs: tuple[Any, ...], features: torch.Tensor) -> tuple[Any, ...]:
        return substitute_changed(self, inputs, features)  # the merged rows only


FAMILY = Family(
    name="Gemma 3",
    model_class=Gemma3ForConditionalGeneration,
    example="google/gemma-3-4b-it",
    vision=GemmaVision,
    modalities=(IMAGE,),
    streams=("token_type_ids",),
    language_stage="its language model has sliding-window attention layers, which the LLM-stage cut does not handle",
)
