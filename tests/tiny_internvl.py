"""A tiny random InternVL model and prompts laid out as its processor lays them out.

InternViT at 32 px with 4 px patches: 8 x 8 patches and a [CLS] per tile, pixel-shuffled 2 x 2 to
4 x 4 = 16 tokens. An image is some tiles plus a thumbnail, all 32 x 32, given to the model as one
flat batch of tiles; in the prompt, ``<img>`` + 16 placeholders per tile + ``</img>``. A video is
frames, each ``Frame<i>: <img>`` + 16 placeholders + ``</img>``. Built from config objects only.
"""

from __future__ import annotations

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

from tests.tiny_models import VOCAB, _finish, _text_config

START, END, CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
INTERNVL_VOCAB = VOCAB + [START, END, CONTEXT]
START_ID, END_ID, CONTEXT_ID = (INTERNVL_VOCAB.index(token) for token in (START, END, CONTEXT))
PAD_ID = 0
TILE = 32
#: Tokens per tile after the 2 x 2 pixel shuffle.
TOKENS = 16


def tiny_internvl(
    seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2, qk_norm: bool = True
) -> InternVLForConditionalGeneration:
    """InternViT (``qk_norm``: InternViT-6B's RMS norms on q and k) and a Qwen2 language model."""
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=TILE,
        patch_size=4,
        use_qk_norm=qk_norm,
        norm_type="rms_norm" if qk_norm else "layer_norm",
        # Peaked attention, so that [CLS] scores are well separated and selections are stable.
        initializer_range=0.2,
        layer_scale_init_value=1.0,
    )
    text = Qwen2Config(**_text_config(text_layers).to_dict() | {"vocab_size": len(INTERNVL_VOCAB)})
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=CONTEXT_ID,
        image_seq_length=TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _finish(InternVLForConditionalGeneration(config), attn_implementation)


def _words(text: str) -> list[int]:
    return [INTERNVL_VOCAB.index(word) for word in text.split()]


def internvl_inputs(prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded inputs for ``prompts``: each a list of words (str), ("image", tiles) and
    ("video", frames); an image of t tiles stands for t - 1 tiles and its thumbnail."""
    rows, tiles = [], 0
    for prompt in prompts:
        ids: list[int] = []
        for part in prompt:
            if isinstance(part, str):
                ids += _words(part)
            elif part[0] == "image":
                ids += [START_ID] + [CONTEXT_ID] * TOKENS * part[1] + [END_ID]
                tiles += part[1]
            else:
                for frame in range(part[1]):
                    ids += _words(f"w{30 + frame}") + [START_ID] + [CONTEXT_ID] * TOKENS + [END_ID]
                tiles += part[1]
        rows.append(ids)
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[PAD_ID] * (width - len(ids)) + ids for ids in rows])
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": input_ids,
        "attention_mask": (input_ids != PAD_ID).long(),
        "pixel_values": torch.randn(tiles, 3, TILE, TILE, generator=generator),
    }


#: Images of different sizes (3 tiles: 2 + thumbnail; 1 tile), two images in a prompt, a video of 2 frames.
PROMPTS = [
    ["w1 w2", ("image", 3), "w3"],
    [("image", 1), "w4", ("image", 2), "w5 w6 w7", ("video", 2), "w8"],
]
