"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one crop per image, its patches in raster order."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from .clip_projector import IMAGE, ProjectorVision
from .vision_stage import Family


def _crops_per_image(model: nn.Module, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> list[int]:
    return [1] * pixel_values.shape[0]


def _pack(model: nn.Module, keeps: list[torch.Tensor], image_sizes: torch.Tensor | None) -> list[torch.Tensor]:
    return [keep[0] for keep in keeps]


FAMILY = Family(
    name="LLaVA-1.5",
    model_class=LlavaForConditionalGeneration,
    example="llava-hf/llava-1.5-7b-hf",
    vision=lambda model: ProjectorVision(model, _crops_per_image, _pack),
    modalities=(IMAGE,),
)
