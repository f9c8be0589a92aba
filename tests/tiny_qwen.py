"""Tiny random Qwen-VL models and hand-built inputs (no processor, nothing downloaded).

A prompt is a list of words ``w<i>`` and visual markers: ``("image", h, w)`` or
``("video", t, h, w)`` with h, w in patches (even: the merger fuses 2 x 2 patches) and t in
temporal groups. Each marker becomes ``<vision_start>``, one placeholder per merged token,
``<vision_end>``, as the processor lays it out; rows are left padded. Patches are 4 px, so
``("image", 4, 6)`` is a 16 x 24 px image of 6 merged tokens.
"""

from __future__ import annotations

import torch
from transformers import (
    BatchFeature,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

PAD_ID, IMAGE_ID, VIDEO_ID, START_ID, END_ID = 0, 5, 6, 7, 8
VOCAB_SIZE = 64
#: Word ``w<i>`` is token id WORD_OFFSET + i.
WORD_OFFSET = 10
PATCH, TEMPORAL, MERGE = 4, 2, 2


def _text_config() -> dict:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD_ID,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        # Peaked logits, so that greedy choices are not near-ties that rounding could flip.
        initializer_range=0.2,
    )


def _vision_config(**extra) -> dict:
    return dict(
        depth=2, num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
        in_channels=3, initializer_range=0.2, **extra,
    )


def _finish(model, attn_implementation: str):
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = None
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def _ids() -> dict:
    return dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START_ID,
                vision_end_token_id=END_ID)


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """Qwen2.5-VL-shaped: windowed first block (windows of 2 x 2 merged tokens), full-attention last block."""
    text = _text_config() | {"num_hidden_layers": text_layers}
    config = Qwen2_5_VLConfig(
        vision_config=_vision_config(hidden_size=32, intermediate_size=64, window_size=16, fullatt_block_indexes=[1],
                                     out_hidden_size=32),
        text_config=text, **_ids(),
    )
    torch.manual_seed(seed)
    return _finish(Qwen2_5_VLForConditionalGeneration(config), attn_implementation)


def tiny_qwen2_vl(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """Qwen2-VL-shaped: full attention in every block."""
    text = _text_config() | {"num_hidden_layers": text_layers}
    config = Qwen2VLConfig(
        vision_config=_vision_config(embed_dim=32, mlp_ratio=2, hidden_size=32), text_config=text, **_ids(),
    )
    torch.manual_seed(seed)
    return _finish(Qwen2VLForConditionalGeneration(config), attn_implementation)


def _qwen3_vision(**extra) -> dict:
    return _vision_config(hidden_size=32, intermediate_size=64, out_hidden_size=32, num_position_embeddings=16, **extra)


def _qwen3_text(layers: int, **extra) -> dict:
    text = _text_config() | {"num_hidden_layers": layers, "head_dim": 8}
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
    return text | extra


def tiny_qwen3_vl(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """Qwen3-VL-shaped: deepstack features of vision blocks 0 and 1 added to the visual tokens after decoder layers 0 and 1."""
    config = Qwen3VLConfig(
        vision_config=_qwen3_vision(deepstack_visual_indexes=[0, 1]), text_config=_qwen3_text(text_layers), **_ids()
    )
    torch.manual_seed(seed)
    return _finish(Qwen3VLForConditionalGeneration(config), attn_implementation)


def tiny_qwen3_vl_moe(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """Qwen3-VL-MoE-shaped: as Qwen3-VL with 4 experts (2 per token) in every decoder layer."""
    text = _qwen3_text(text_layers, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(vision_config=_qwen3_vision(deepstack_visual_indexes=[0]), text_config=text, **_ids())
    torch.manual_seed(seed)
    return _finish(Qwen3VLMoeForConditionalGeneration(config), attn_implementation)


def _qwen3_5_text(layers: int, **extra) -> dict:
    text = _qwen3_text(
        layers, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=(["linear_attention", "full_attention"] * layers)[:layers], **extra,
    )
    text["rope_parameters"] |= {"partial_rotary_factor": 1.0}
    return text


def tiny_qwen3_5(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """Qwen3.5-shaped: a linear-attention (gated delta) decoder layer, then a full-attention one."""
    config = Qwen3_5Config(vision_config=_qwen3_vision(), text_config=_qwen3_5_text(text_layers), **_ids())
    torch.manual_seed(seed)
    return _finish(Qwen3_5ForConditionalGeneration(config), attn_implementation)


def tiny_qwen3_5_moe(seed: int = 0, attn_implementation: str = "sdpa", text_layers: int = 2):
    """Qwen3.5-MoE-shaped: as Qwen3.5 with 4 routed experts (2 per token) and a shared expert in every layer."""
    text = _qwen3_5_text(
        text_layers, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    )
    config = Qwen3_5MoeConfig(vision_config=_qwen3_vision(), text_config=text, **_ids())
    torch.manual_seed(seed)
    return _finish(Qwen3_5MoeForConditionalGeneration(config), attn_implementation)


BUILDERS = {
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": tiny_qwen3_vl_moe,
    "qwen3_5": tiny_qwen3_5,
    "qwen3_5_moe": tiny_qwen3_5_moe,
}
#: Families whose prompts give each temporal group of a video its own placeholder run (after a
#: timestamp), as their processors do.
FRAMES_SEPARATED = {"qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"}


def tiny_qwen_inputs(prompts: list[list], seed: int = 0, frames_separated: bool = False) -> BatchFeature:
    """input_ids, attention_mask, mm_token_type_ids and pixels for ``prompts`` (see the module doc).

    ``frames_separated``: each temporal group of a video gets its own vision start/end after a
    timestamp word (Qwen3-VL, Qwen3.5); otherwise a video is one run of placeholders.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, grids = [], {"image": [], "video": []}
    for prompt in prompts:
        row = []
        for part in prompt:
            if isinstance(part, str):
                row.append(WORD_OFFSET + int(part[1:]))
                continue
            kind, *shape = part
            t, h, w = (1, *shape) if kind == "image" else shape
            grids[kind].append((t, h, w))
            token = IMAGE_ID if kind == "image" else VIDEO_ID
            if kind == "video" and frames_separated:
                for group in range(t):
                    row += [WORD_OFFSET + 40 + group, START_ID] + [token] * (h * w // MERGE**2) + [END_ID]
            else:
                row += [START_ID] + [token] * (t * h * w // MERGE**2) + [END_ID]
        rows.append(row)
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD_ID] * (length - len(row)) + row for row in rows])
    features = {
        "input_ids": input_ids,
        "attention_mask": (torch.arange(length) >= torch.tensor([length - len(r) for r in rows]).unsqueeze(1)).long(),
        "mm_token_type_ids": (input_ids == IMAGE_ID).int() + 2 * (input_ids == VIDEO_ID).int(),
    }
    return BatchFeature(features | pixel_inputs(grids, generator))


def pixel_inputs(grids: dict[str, list[tuple[int, int, int]]], generator: torch.Generator) -> dict:
    """Random patch rows and (t, h, w) grids for the ``"image"`` and ``"video"`` grids given."""
    width = 3 * TEMPORAL * PATCH * PATCH
    features = {}
    for kind, pixels, grid_name in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            features[pixels] = torch.randn(int(grid.prod(-1).sum()), width, generator=generator)
            features[grid_name] = grid
    return features


#: Two left-padded rows: a video of 3 temporal groups; an image and a video of 2 groups.
MIXED_PROMPTS = [["w1", ("video", 3, 4, 4), "w2"], ["w3", ("image", 6, 4), "w4", ("video", 2, 4, 6), "w5", "w6", "w7"]]


def family_inputs(family: str, prompts: list[list]) -> BatchFeature:
    """:func:`tiny_qwen_inputs` laid out as ``family`` (one of :data:`BUILDERS`) lays out videos."""
    return tiny_qwen_inputs(prompts, frames_separated=family in FRAMES_SEPARATED)
