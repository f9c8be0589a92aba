"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``): images and video, before a hybrid
(linear-attention and full-attention) language model."""

from __future__ import annotations

from transformers import Qwen3_5ForConditionalGeneration

from .qwen_vision import IMAGE, STREAMS, VIDEO, QwenVision, RopePositions
from .vision_stage import Family

FAMILY = Family(
    name="Qwen3.5",
    model_class=Qwen3_5ForConditionalGeneration,
    example="Qwen/Qwen3.5-27B",
    vision=QwenVision,
    modalities=(IMAGE, VIDEO),
    positions=RopePositions(),
    streams=STREAMS,
    shared_piece_budget=True,
    original_positions_only=True,
    language_stage=(
        "it needs softmax attention in every decoder layer, and this language model mixes in linear-attention "
        "(gated delta rule) layers"
    ),
)
