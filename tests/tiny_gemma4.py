"""A tiny random Gemma 4 model and prompts laid out as its processor lays them out.

The encoder takes 4 px patches, each image at its own size (a multiple of 8 px, as the processor
resizes them), listed in raster order with (x, y) positions and padded to :data:`MAX_PATCHES`
(position -1); its pooler averages 2 x 2 patches into one token. In the prompt an image is
``<boi>``, one image placeholder per token, ``<eoi>``; a video is, per frame, a timestamp word
and the same with the video placeholder. The language model has a sliding-window layer with bidirectional
attention among an image's tokens, a global layer, logit soft-capping and (``per_layer=True``,
as in the small checkpoints) per-layer embeddings. Built from config objects only.
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)

from tests.tiny_models import VOCAB, _finish

BOI, EOI, BOA, EOA = "<boi>", "<eoi>", "<boa>", "<eoa>"
GEMMA4_VOCAB = VOCAB + [BOI, EOI, BOA, EOA]
BOI_ID, EOI_ID, BOA_ID, EOA_ID = (GEMMA4_VOCAB.index(token) for token in (BOI, EOI, BOA, EOA))
#: The placeholders lie outside the vocabulary, which the model allows (it embeds them as padding),
#: so that the tiny model never generates one.
IMG_ID, VID_ID, AUD_ID = len(GEMMA4_VOCAB), len(GEMMA4_VOCAB) + 1, len(GEMMA4_VOCAB) + 2
PAD_ID = 0
PATCH = 4
KERNEL = 2
#: Pixels per token along a side.
STEP = PATCH * KERNEL
#: Audio features per frame; the tower makes a token of 4 frames.
MEL_BINS = 16
#: Patches of every image after padding (the processor pads to its token budget times KERNEL^2).
MAX_PATCHES = 64


def tiny_gemma4(
    seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2,
    per_layer: bool = False, in_vocab: bool = False, audio: bool = False, **text_options,
) -> Gemma4ForConditionalGeneration:
    """``per_layer``: per-layer embeddings (E2B, E4B); ``audio``: an audio tower (16 mel bins, a
    token per 4 frames); ``in_vocab``: the placeholders get embeddings
    (as in the checkpoints), so that a prompt can be given as ``inputs_embeds``; ``text_options``:
    further language-model settings."""
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, patch_size=PATCH, pooling_kernel_size=KERNEL, position_embedding_size=32,
        standardize=True, initializer_range=0.2,
    )
    text = Gemma4TextConfig(
        vocab_size=len(GEMMA4_VOCAB) + (3 if in_vocab else 0), hidden_size=32, intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        layer_types=(["sliding_attention", "full_attention"] * text_layers)[:text_layers],
        sliding_window=256, final_logit_softcapping=30.0, use_bidirectional_attention="vision",
        vocab_size_per_layer_input=len(GEMMA4_VOCAB) + 3, hidden_size_per_layer_input=8 if per_layer else 0,
        pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, initializer_range=0.2, max_position_embeddings=1024,
        **{"global_head_dim": 8, **text_options},
    )
    config = Gemma4Config(
        text_config=text, vision_config=vision, audio_config=_audio_config() if audio else None,
        boi_token_id=BOI_ID, eoi_token_id=EOI_ID,
        image_token_id=IMG_ID, video_token_id=VID_ID, audio_token_id=AUD_ID, boa_token_id=BOA_ID,
        eoa_token_index=EOA_ID, tie_word_embeddings=False, initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():  # random standardisation (initialised to nothing in particular)
        tower = model.model.vision_tower
        tower.std_bias.normal_(0, 0.5)
        tower.std_scale.uniform_(0.5, 1.5)
    if audio:  # the audio tower has eager attention only
        attn_implementation = {"": attn_implementation, "text_config": attn_implementation,
                               "vision_config": attn_implementation, "audio_config": "eager"}
    return _finish(model, attn_implementation)


def _audio_config() -> Gemma4AudioConfig:
    return Gemma4AudioConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[MEL_BINS, 4],
        output_proj_dims=16, use_clipped_linears=False, initializer_range=0.2,
    )


def _words(text: str) -> list[int]:
    return [GEMMA4_VOCAB.index(word) for word in text.split()]


def _patches(height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(MAX_PATCHES, 3 * PATCH^2) pixel patches of a random image and their (x, y) positions."""
    rows, cols = height // PATCH, width // PATCH
    image = torch.rand(3, height, width, generator=generator)
    patches = image.reshape(3, rows, PATCH, cols, PATCH).permute(1, 3, 2, 4, 0).reshape(rows * cols, -1)
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
    padding = MAX_PATCHES - rows * cols
    patches = torch.cat([patches, torch.zeros(padding, patches.shape[1])])
    positions = torch.cat([positions, torch.full((padding, 2), -1)])
    return patches, positions


def gemma4_inputs(prompts: list[list], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded inputs for ``prompts``: each a list of words (str), (height, width) images in
    px, ("video", frames, height, width) videos and ("audio", frames) clips (a multiple of 4
    frames; at most one clip per prompt, padded to the batch's longest)."""
    rows, images, videos, frames, clips = [], [], [], [], []
    for prompt in prompts:
        ids: list[int] = []
        for part in prompt:
            if isinstance(part, str):
                ids += _words(part)
            elif part[0] == "audio":
                ids += [BOA_ID] + [AUD_ID] * (part[1] // 4) + [EOA_ID]
                clips.append(part[1])
            elif part[0] == "video":
                _, count, height, width = part
                per_frame = (height // STEP) * (width // STEP)
                for frame in range(count):
                    ids += _words(f"w{40 + frame}") + [BOI_ID] + [VID_ID] * per_frame + [EOI_ID]
                    videos.append((height, width))
                frames.append(count)
            else:
                height, width = part
                ids += [BOI_ID] + [IMG_ID] * ((height // STEP) * (width // STEP)) + [EOI_ID]
                images.append(part)
        rows.append(ids)
    length = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[PAD_ID] * (length - len(ids)) + ids for ids in rows])
    types = torch.zeros_like(input_ids).masked_fill(input_ids == IMG_ID, 1).masked_fill(input_ids == VID_ID, 2)
    types = types.masked_fill(input_ids == AUD_ID, 3)
    inputs = {"input_ids": input_ids, "attention_mask": (input_ids != PAD_ID).long(), "mm_token_type_ids": types}
    generator = torch.Generator().manual_seed(seed)
    for sizes, pixels, positions in ((images, "pixel_values", "image_position_ids"),
                                     (videos, "pixel_values_videos", "video_position_ids")):
        if sizes:
            patches = [_patches(height, width, generator) for height, width in sizes]
            inputs[pixels] = torch.stack([values for values, _ in patches])
            inputs[positions] = torch.stack([where for _, where in patches])
    if frames:
        inputs["num_frames_per_video"] = torch.tensor(frames)
    if clips:
        longest = max(clips)
        inputs["input_features"] = torch.randn(len(clips), longest, MEL_BINS, generator=generator)
        inputs["input_features_mask"] = torch.arange(longest) < torch.tensor(clips)[:, None]
    return inputs


#: Images of different sizes and shapes, two in one prompt (at most MAX_PATCHES patches each).
PROMPTS = [
    ["w1 w2", (32, 16), "w3"],
    [(16, 24), "w4", (24, 24), "w5 w6 w7"],
]

#: A video of 2 frames after an image, and a prompt with a video only.
VIDEO_PROMPTS = [
    ["w1", (16, 32), "w2", ("video", 2, 16, 24), "w3"],
    [("video", 3, 24, 16), "w5 w6"],
]

#: Audio clips of 40 and 24 frames (10 and 6 tokens) next to images.
AUDIO_PROMPTS = [
    ["w1", ("audio", 40), "w2", (16, 32), "w3"],
    [(24, 16), "w4", ("audio", 24), "w5 w6"],
]
