"""Tiny random GLM-4.1V / GLM-4.5V models and hand-built inputs (no processor, nothing downloaded).

A prompt is a list of words ``w<i>`` and visual markers, as in tests/tiny_qwen.py: ``("image",
h, w)`` or ``("video", t, h, w)``, h and w in 4 px patches (even: the tower's 2 x 2 conv merges
them), t in temporal groups. They are laid out as GLM's processor does: an image is
``<begin_of_image>``, one ``<image>`` per merged token, ``<end_of_image>``; a video is
``<begin_of_video>``, then per temporal group ``<begin_of_image>``, its ``<image>`` tokens,
``<end_of_image>`` and a timestamp word, then ``<end_of_video>``. Video frames use the IMAGE
token too: only ``mm_token_type_ids`` (1 image, 2 video) tells them apart.
"""

from __future__ import annotations

import torch
from transformers import (
    BatchFeature,
    Glm4vConfig,
    Glm4vForConditionalGeneration,
    Glm4vMoeConfig,
    Glm4vMoeForConditionalGeneration,
)

from .tiny_qwen import IMAGE_ID, MERGE, PAD_ID, PATCH, TEMPORAL, VIDEO_ID, WORD_OFFSET, _finish, pixel_inputs

BEGIN_VIDEO, END_VIDEO, BEGIN_IMAGE, END_IMAGE = 3, 4, 7, 8
VOCAB_SIZE = 64
#: Two left-padded rows, images of different sizes, two in the second row.
IMAGES = [["w1", "w2", ("image", 4, 6), "w3"], [("image", 8, 8), "w4", ("image", 4, 4), "w5", "w6"]]
#: Two left-padded rows of videos (the stock GLM models take images and videos in separate calls).
VIDEOS = [["w1", ("video", 3, 4, 4), "w2"], ["w3", ("video", 2, 4, 6), "w5", "w6", "w7"]]


def _text_config(layers: int) -> dict:
    # head_dim 16 with half of it rotated (GLM's partial rotary), in 2 + 1 + 1 M-RoPE sections.
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_ID,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                         "partial_rotary_factor": 0.5},
        initializer_range=0.2,  # peaked logits: greedy choices are no near-ties
    )


def _vision_config() -> dict:
    return dict(
        depth=2, hidden_size=32, intermediate_size=48, num_heads=4, image_size=32, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=64, in_channels=3,
        initializer_range=0.2,
    )


def _ids() -> dict:
    return dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, image_start_token_id=BEGIN_IMAGE,
                image_end_token_id=END_IMAGE, video_start_token_id=BEGIN_VIDEO, video_end_token_id=END_VIDEO)


def tiny_glm4v(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """GLM-4.1V-shaped: a tower ending in a 2 x 2 conv and a merger MLP, a dense GLM-4 decoder."""
    config = Glm4vConfig(vision_config=_vision_config(), text_config=_text_config(text_layers), **_ids())
    torch.manual_seed(seed)
    return _finish(Glm4vForConditionalGeneration(config), attn_implementation)


def tiny_glm4v_moe(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """GLM-4.5V-shaped: the same tower; a dense first decoder layer, then layers of 4 routed
    experts (2 per token, sigmoid router) and a shared expert."""
    text = _text_config(text_layers) | dict(
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
        first_k_dense_replace=1, n_group=1, topk_group=1,
    )
    config = Glm4vMoeConfig(vision_config=_vision_config(), text_config=text, **_ids())
    torch.manual_seed(seed)
    return _finish(Glm4vMoeForConditionalGeneration(config), attn_implementation)


BUILDERS = {"glm4v": tiny_glm4v, "glm4v_moe": tiny_glm4v_moe}


def tiny_glm_inputs(prompts: list[list], seed: int = 0) -> BatchFeature:
    """input_ids, attention_mask, mm_token_type_ids and pixels for ``prompts`` (see the module doc)."""
    generator = torch.Generator().manual_seed(seed)
    rows, types, grids = [], [], {"image": [], "video": []}
    for prompt in prompts:
        row, kind_of = [], []
        for part in prompt:
            if isinstance(part, str):
                row.append(WORD_OFFSET + int(part[1:]))
                kind_of.append(0)
                continue
            kind, *shape = part
            t, h, w = (1, *shape) if kind == "image" else shape
            grids[kind].append((t, h, w))
            frame = [BEGIN_IMAGE] + [IMAGE_ID] * (h * w // MERGE**2) + [END_IMAGE]
            if kind == "image":
                row += frame
                kind_of += [1 if token == IMAGE_ID else 0 for token in frame]
            else:
                span = [BEGIN_VIDEO]
                for group in range(t):
                    span += frame + [WORD_OFFSET + 40 + group]
                span.append(END_VIDEO)
                row += span
                kind_of += [2 if token == IMAGE_ID else 0 for token in span]
        rows.append(row)
        types.append(kind_of)
    length = max(map(len, rows))
    pads = [length - len(row) for row in rows]
    features = {
        "input_ids": torch.tensor([[PAD_ID] * pad + row for pad, row in zip(pads, rows)]),
        "attention_mask": (torch.arange(length) >= torch.tensor(pads).unsqueeze(1)).long(),
        "mm_token_type_ids": torch.tensor([[0] * pad + kinds for pad, kinds in zip(pads, types)]),
    }
    return BatchFeature(features | pixel_inputs(grids, generator))
