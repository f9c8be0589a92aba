"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops, unpadded and packed with newlines.

The packed order of an image's tokens (base image, then the high-resolution grid unpadded, one
newline token per row) comes from the model's own ``pack_image_features`` run on the keep mask
as a one-channel feature whose newline value is 1: newlines are always kept, and unpadding
removes exactly the flags of the patches it removes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .clip_projector import IMAGE, ProjectorVision
from .vision_stage import Family


def _crops_per_image(model: nn.Module, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[int]:
    config = model.config
    return [
        image_size_to_num_patches(
            image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
        )
        for size in image_sizes
    ]


def _pack(model: nn.Module, keeps: list[torch.Tensor], image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    flags = [keep.unsqueeze(-1).float() for keep in keeps]
    packed, _ = model.model.pack_image_features(
        flags, image_sizes, vision_feature_select_strategy="default", image_newline=flags[0].new_ones(1)
    )
    return [column[:, 0] > 0.5 for column in packed]


FAMILY = Family(
    name="LLaVA-NeXT",
    model_class=LlavaNextForConditionalGeneration,
    example="llava-hf/llava-v1.6-vicuna-7b-hf",
    vision=lambda model: ProjectorVision(model, _crops_per_image, _pack),
    modalities=(IMAGE,),
)
