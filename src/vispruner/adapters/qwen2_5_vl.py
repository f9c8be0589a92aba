"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and video, merged tokens chosen before the language model."""

from __future__ import annotations

from transformers import Qwen2_5_VLForConditionalGeneration

from .qwen_vision import IMAGE, STREAMS, VIDEO, QwenVision, RopePositions
from .vision_stage import Family

FAMILY = Family(
    name="Qwen2.5-VL",
    model_class=Qwen2_5_VLForConditionalGeneration,
    example="Qwen/Qwen2.5-VL-7B-Instruct",
    vision=QwenVision,
    modalities=(IMAGE, VIDEO),
    positions=RopePositions(),
    streams=STREAMS,
    shared_piece_budget=True,
    original_positions_only=True,
)
