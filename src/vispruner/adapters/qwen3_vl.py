"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and its MoE variant): images and video.

Its deepstack features (merged visual features of early vision blocks, added to the visual
tokens of the first decoder layers) follow the keep mask of the tokens they are added to.
"""

from __future__ import annotations

from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

from .qwen_vision import IMAGE, STREAMS, VIDEO, QwenVision, RopePositions
from .vision_stage import Family

FAMILY = Family(
    name="Qwen3-VL",
    model_class=(Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration),
    example="Qwen/Qwen3-VL-8B-Instruct",
    vision=QwenVision,
    modalities=(IMAGE, VIDEO),
    positions=RopePositions(),
    streams=STREAMS,
    item_streams=("deepstack_features",),
    shared_piece_budget=True,
    original_positions_only=True,
)
