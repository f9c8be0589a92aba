"""A tiny random Mistral 3 model and prompts laid out as its processor lays them out.

A Pixtral tower with 4 px patches takes each image at its own size (a multiple of 8 px, as the
processor resizes them), padded to the batch's largest; the 2 x 2 patch merger makes one token per
8 x 8 px. In the prompt, each row of merged tokens is ``[IMG]`` placeholders and ``[IMG_BREAK]``,
the last row's break replaced by ``[IMG_END]``. Built from config objects only.
"""

from __future__ import annotations

import torch
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

from tests.tiny_models import VOCAB, _finish, _text_config

IMG, BREAK, END = "[IMG]", "[IMG_BREAK]", "[IMG_END]"
MISTRAL_VOCAB = VOCAB + [IMG, BREAK, END]
IMG_ID, BREAK_ID, END_ID = (MISTRAL_VOCAB.index(token) for token in (IMG, BREAK, END))
PAD_ID = 0
PATCH = 4
#: Pixels per merged token along a side.
STEP = 8


def tiny_mistral3(seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2):
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4, head_dim=8,
        image_size=64, patch_size=PATCH, initializer_range=0.2,
    )
    text = MistralConfig(**_text_config(text_layers).to_dict() | {"vocab_size": len(MISTRAL_VOCAB), "sliding_window": None})
    config = Mistral3Config(
        vision_config=vision, text_config=text, image_token_index=IMG_ID, spatial_merge_size=2,
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _finish(Mistral3ForConditionalGeneration(config), attn_implementation)


def _words(text: str) -> list[int]:
    return [MISTRAL_VOCAB.index(word) for word in text.split()]


def mistral3_inputs(prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded inputs for ``prompts``: each a list of words (str) and (height, width) images in px."""
    rows, sizes = [], []
    for prompt in prompts:
        ids: list[int] = []
        for part in prompt:
            if isinstance(part, str):
                ids += _words(part)
                continue
            height, width = part
            image = ([IMG_ID] * (width // STEP) + [BREAK_ID]) * (height // STEP)
            ids += image[:-1] + [END_ID]
            sizes.append(part)
        rows.append(ids)
    length = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[PAD_ID] * (length - len(ids)) + ids for ids in rows])
    generator = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    pixels = torch.zeros(len(sizes), 3, height, width)
    for index, (h, w) in enumerate(sizes):
        pixels[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD_ID).long(),
        "pixel_values": pixels,
        "image_sizes": torch.tensor(sizes),
    }


#: Images of different sizes and shapes, two in one prompt.
PROMPTS = [
    ["w1 w2", (32, 48), "w3"],
    [(16, 40), "w4", (24, 24), "w5 w6 w7"],
]
