"""Tiny random LLaVA-1.5 and LLaVA-NeXT models, an offline tokenizer and processor, and inputs.

Everything is built from config objects: nothing is downloaded. The models are small enough that
a forward pass takes milliseconds on one CPU core, and large enough that pruning matters: 64
patches per crop (32 px images, 4 px patches), two vision layers so that the feature layer (-2)
is not the last one, and a two-layer Llama language model with grouped-query attention.

Typical use::

    model = tiny_llava()
    inputs = tiny_inputs(model, ["w1 w2 <image> w3", "<image> w4 <image> w5 w6"])
    model.generate(**inputs, max_new_tokens=4)
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BatchFeature,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

IMAGE = "<image>"
#: Special tokens first, then the words prompts are made of (``w0`` ... ``w39``).
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", IMAGE] + [f"w{i}" for i in range(43)]
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 1, 2, 4

IMAGE_SIZE = 32
PATCH_SIZE = 4
#: Patches per crop: (32 / 4) ** 2.
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
#: LLaVA-NeXT resolutions (height, width): 1x2, 2x1 and 2x2 crops plus the base image.
GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`VOCAB` that pads on the left, as generation needs."""
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
    )


def _vision_config(layers: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
        # Peaked attention, so that [CLS] scores are well separated and selections are stable.
        initializer_factor=4.0,
    )


def _text_config(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        # Larger weights than the default 0.02 give peaked logits, so greedy choices are not
        # near-ties that rounding noise could flip.
        initializer_range=0.2,
    )


def _finish(model, attn_implementation: str):
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def _build(model_class, config_class, seed, attn_implementation, vision_layers, text_layers, **extra):
    config = config_class(
        vision_config=_vision_config(vision_layers),
        text_config=_text_config(text_layers),
        image_token_id=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD_ID,
        **extra,
    )
    torch.manual_seed(seed)
    return _finish(model_class(config), attn_implementation)


def tiny_llava(
    seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2
) -> LlavaForConditionalGeneration:
    """A random LLaVA-1.5-shaped model: CLIP tower, feature layer -2, [CLS] dropped, 64 patches."""
    return _build(LlavaForConditionalGeneration, LlavaConfig, seed, attn_implementation, vision_layers, text_layers)


def tiny_llava_next(
    seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2
) -> LlavaNextForConditionalGeneration:
    """A random LLaVA-NeXT-shaped model: anyres crops of 32 px over :data:`GRID_PINPOINTS`."""
    return _build(
        LlavaNextForConditionalGeneration, LlavaNextConfig, seed, attn_implementation, vision_layers, text_layers,
        image_grid_pinpoints=GRID_PINPOINTS,
    )


def tiny_processor(model) -> LlavaProcessor | LlavaNextProcessor:
    """The processor matching ``model`` (a tiny LLaVA or LLaVA-NeXT), offline."""
    common = dict(
        tokenizer=tiny_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if isinstance(model, LlavaNextForConditionalGeneration):
        images = LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=GRID_PINPOINTS)
        return LlavaNextProcessor(image_processor=images, **common)
    return LlavaProcessor(image_processor=CLIPImageProcessorPil(size=size, crop_size=crop), **common)


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    """RGB noise images of the given (height, width)."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def tiny_inputs(
    model,
    texts: list[str],
    image_sizes: list[tuple[int, int]] | None = None,
    seed: int = 0,
) -> BatchFeature:
    """Processor output for ``texts`` (words ``w0``-``w42`` and ``<image>`` markers), left padded.

    ``image_sizes`` gives (height, width) for each ``<image>`` in reading order over the batch;
    by default every image is 32 x 32 (for LLaVA-NeXT, try sizes like (20, 60) or (64, 30) to get
    different crop grids and unpadding).
    """
    count = sum(text.count(IMAGE) for text in texts)
    sizes = image_sizes if image_sizes is not None else [(IMAGE_SIZE, IMAGE_SIZE)] * count
    if len(sizes) != count:
        raise ValueError(f"image_sizes must give one size per <image> marker ({count}); got {len(sizes)}")
    processor = tiny_processor(model)
    images = random_images(sizes, seed) if count else None
    return processor(images=images, text=texts, padding=True, return_tensors="pt")
