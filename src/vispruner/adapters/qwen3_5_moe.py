"""Qwen3.5-MoE (``Qwen3_5MoeForConditionalGeneration``): Qwen3.5 with a mixture-of-experts language model.

The vision tower, merger, processor layout and 3D positions are Qwen3.5's, so every answer of
:mod:`.qwen3_5` holds (signal: attention received in the tower's last block, averaged per 2 x 2
merge group; features: the merger's input; unit: image, or temporal group of a video; order:
merged raster per image; positions: the unpruned prompt's 3D M-RoPE positions, gathered; streams:
``mm_token_type_ids``). Only the language model differs: its experts route each token on its
own, so dropping visual tokens changes no other token's route. Its linear-attention layers
refuse LLM-stage methods, as Qwen3.5's do.
"""

from __future__ import annotations

from dataclasses import replace

from transformers import Qwen3_5MoeForConditionalGeneration

from .qwen3_5 import FAMILY as QWEN3_5

FAMILY = replace(
    QWEN3_5, name="Qwen3.5-MoE", model_class=Qwen3_5MoeForConditionalGeneration, example="Qwen/Qwen3.5-35B-A3B"
)
