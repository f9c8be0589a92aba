"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): images and video, merged tokens chosen before the language model."""

from __future__ import annotations

from transformers import Qwen2VLForConditionalGeneration

from .qwen_vision import IMAGE, STREAMS, VIDEO, QwenVision, RopePositions
from .vision_stage import Family

FAMILY = Family(
    name="Qwen2-VL",
    model_class=Qwen2VLForConditionalGeneration,
    example="Qwen/Qwen2-VL-7B-Instruct",
    vision=QwenVision,
    modalities=(IMAGE, VIDEO),
    positions=RopePositions(),
    streams=STREAMS,
    shared_piece_budget=True,
    original_positions_only=True,
)
