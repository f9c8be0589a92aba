"""Tiny random SmolVLM and Idefics3 models and prompts laid out as their processor lays them out.

SigLIP at 32 px with 4 px patches: 8 x 8 patches per tile, pixel-shuffled 2 x 2 by the connector
to 4 x 4 = 16 tokens. An image split into r x c tiles is, per tile, ``<fake> <row_i_col_j>`` and
16 placeholders, then ``<fake> <global-img>`` and the global image's 16 placeholders and
``<fake>``; an image not split is the global part only. Tiles of a prompt are padded with
all-zero tiles to the batch's longest, as the processor pads them. Built from config objects only.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
)

from tests.tiny_models import VOCAB, _finish, _text_config
from vispruner.adapters.hf_seam import check_release

FAKE, GLOBAL, IMAGE = "<fake_token_around_image>", "<global-img>", "<image>"
HEADERS = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]
SMOL_VOCAB = VOCAB + [FAKE, GLOBAL, *HEADERS]
FAKE_ID, GLOBAL_ID = SMOL_VOCAB.index(FAKE), SMOL_VOCAB.index(GLOBAL)
IMAGE_ID = SMOL_VOCAB.index(IMAGE)
PAD_ID = 0
TILE = 32
TOKENS = 16


def _tiny(model_class, config_class, vision_class, seed: int, attn_implementation: str, vision_layers: int, text_layers: int):
    vision = vision_class(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
        image_size=TILE, patch_size=4,
    )
    text = LlamaConfig(**_text_config(text_layers).to_dict() | {"vocab_size": len(SMOL_VOCAB)})
    config = config_class(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, scale_factor=2)
    torch.manual_seed(seed)
    return _finish(model_class(config), attn_implementation)


def tiny_smolvlm(seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2):
    model = _tiny(SmolVLMForConditionalGeneration, SmolVLMConfig, SmolVLMVisionConfig, seed, attn_implementation,
                  vision_layers, text_layers)
    try:
        check_release(model)
    except TypeError as refusal:  # transformers 5.20's own SmolVLM cannot take pruned tokens
        pytest.skip(str(refusal))
    return model


def tiny_idefics3(seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2):
    return _tiny(Idefics3ForConditionalGeneration, Idefics3Config, Idefics3VisionConfig, seed, attn_implementation,
                 vision_layers, text_layers)


def _words(text: str) -> list[int]:
    return [SMOL_VOCAB.index(word) for word in text.split()]


def smolvlm_inputs(prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded inputs for ``prompts``: each a list of words (str) and ("image", rows, cols)
    (0, 0: not split) or ("video", frames)."""
    rows, tiles = [], []
    for prompt in prompts:
        ids: list[int] = []
        count = 0
        for part in prompt:
            if isinstance(part, str):
                ids += _words(part)
            elif part[0] == "image":
                _, grid_rows, grid_cols = part
                for r in range(grid_rows):
                    for c in range(grid_cols):
                        ids += [FAKE_ID, SMOL_VOCAB.index(f"<row_{r + 1}_col_{c + 1}>")] + [IMAGE_ID] * TOKENS
                ids += [FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * TOKENS + [FAKE_ID]
                count += grid_rows * grid_cols + 1
            else:
                for frame in range(part[1]):
                    ids += _words(f"w{30 + frame}") + [FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * TOKENS + [FAKE_ID]
                count += part[1]
        rows.append(ids)
        tiles.append(count)
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[PAD_ID] * (width - len(ids)) + ids for ids in rows])
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(len(prompts), max(tiles), 3, TILE, TILE)
    mask = torch.zeros(len(prompts), max(tiles), TILE, TILE, dtype=torch.long)
    for row, count in enumerate(tiles):
        pixels[row, :count] = torch.randn(count, 3, TILE, TILE, generator=generator)
        mask[row, :count] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD_ID).long(),
        "pixel_values": pixels,
        "pixel_attention_mask": mask,
    }


#: A split image (2 x 2 tiles + global) and a small one (global only) in one prompt, a video of 2
#: frames in the other: different tile counts, so the shorter prompt's tiles are padded.
PROMPTS = [
    ["w1 w2", ("image", 2, 2), "w3", ("image", 0, 0), "w4"],
    [("image", 1, 2), "w5 w6 w7", ("video", 2), "w8"],
]
