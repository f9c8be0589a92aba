"""GLM-4.1V (``Glm4vForConditionalGeneration``): images and video, merged tokens chosen before the language model.

The tower is Qwen-like (no [CLS]; blocks with a fused qkv attention and 2D rotary embeddings;
each 2 x 2 group of patches becomes one language-model token), so :mod:`.qwen_vision` serves it
with two differences, stated here:

* Importance signal: the attention each patch receives in the tower's last block, from the
  patches of its image (or video frame), averaged over the 2 x 2 group of each token.
* Diversity features: the merger's input. GLM fuses a token's 4 patches with a 2 x 2 conv
  *before* its merger, so that input is one row per token (Qwen's merger takes the 4 patch rows).
* Selection unit: an image; a video's temporal group (its tower and positions treat each group as
  a frame of its own); ``num_tokens`` is shared by a video's groups, ``budget="per_image"`` spends
  it over the whole video.
* Order and packing: merged raster per image and per frame; each frame of a video is its own
  placeholder run (``<begin_of_image>`` ... ``<end_of_image>`` and a timestamp).
* Positions: the unpruned prompt's 3D M-RoPE positions (the model's ``get_rope_index``), kept
  columns gathered; decoding continues after the unpruned prompt.
* Per-token streams: ``mm_token_type_ids``. Video frames use the *image* placeholder id, so it is
  also what tells a video's placeholders (type 2) from an image's (type 1).

Refused as by the stock model (its own error): images and videos in one call. Refused with
pruning: beam search or ``num_return_sequences`` > 1 when a prompt holds several images or a
video, which the stock ``generate()`` copies wrongly (see ``repeats_wrongly``).
"""

from __future__ import annotations

from dataclasses import replace

from transformers import Glm4vForConditionalGeneration

from .qwen_vision import IMAGE, STREAMS, VIDEO, QwenVision, RopePositions
from .vision_stage import Family


class GlmVision(QwenVision):
    """:class:`~.vision_stage.VisionSide` of one GLM-4.1V / GLM-4.5V model."""

    fused_before_merger = True


FAMILY = Family(
    name="GLM-4.1V",
    model_class=Glm4vForConditionalGeneration,
    example="zai-org/GLM-4.1V-9B-Thinking",
    vision=GlmVision,
    modalities=(replace(IMAGE, token_type=1), replace(VIDEO, token_id="image_token_id", token_type=2)),
    positions=RopePositions(),
    streams=STREAMS,
    shared_piece_budget=True,
    original_positions_only=True,
    repeats_wrongly=(
        "its generate() (transformers 5.19 to 5.25) repeats each image of a prompt in place ([A, A, B, B] for the "
        "copies of a prompt of A and B), so copies get each other's images, and it finds no video placeholders"
    ),
)
