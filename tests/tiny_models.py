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
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTokenizerFast,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
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


def tiny_tokenizer(vocab: list[str] | None = None, **special: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab`` (default :data:`VOCAB`) that pads on the left, as
    generation needs; ``special`` names more special tokens (``video_token="<video>"``)."""
    vocab = VOCAB if vocab is None else vocab
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE, **special},
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


class _OnevisionImageProcessor(LlavaOnevisionProcessor):
    """LLaVA-OneVision's processor for images and text only: its video processor needs torchvision,
    which is not installed, so tests build video inputs by hand (:func:`tiny_video_inputs`)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return type(None)
        return super().check_argument_for_proper_class(argument_name, argument)


def tiny_processor(model) -> LlavaProcessor | LlavaNextProcessor | LlavaOnevisionProcessor | Gemma3Processor:
    """The processor matching ``model`` (a tiny LLaVA, LLaVA-NeXT, LLaVA-OneVision or Gemma 3), offline."""
    if isinstance(model, LlavaOnevisionForConditionalGeneration):
        images = LlavaOnevisionImageProcessorPil(
            size={"height": OV_IMAGE_SIZE, "width": OV_IMAGE_SIZE}, image_grid_pinpoints=OV_PINPOINTS
        )
        tokenizer = tiny_tokenizer(SIGLIP_VOCAB, video_token=VIDEO)
        return _OnevisionImageProcessor(
            image_processor=images, tokenizer=tokenizer, num_image_tokens=OV_SIDE**2, vision_feature_select_strategy="full"
        )
    if isinstance(model, Gemma3ForConditionalGeneration):
        tokenizer = tiny_tokenizer(SIGLIP_VOCAB, image_token=SOFT, boi_token=BOI, eoi_token=EOI)
        images = Gemma3ImageProcessorPil(size={"height": GEMMA_IMAGE_SIZE, "width": GEMMA_IMAGE_SIZE})
        return Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=GEMMA_TOKENS)
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
    if isinstance(model, (LlavaOnevisionForConditionalGeneration, Gemma3ForConditionalGeneration)) and images:
        # These processors take the images of each prompt as one list (OneVision: a prompt with
        # several images gets one base crop per image); Gemma 3 marks an image with its begin token.
        starts = np.cumsum([0] + [text.count(IMAGE) for text in texts])
        images = [images[a:b] for a, b in zip(starts[:-1], starts[1:])]
        if isinstance(model, Gemma3ForConditionalGeneration):
            texts = [text.replace(IMAGE, BOI) for text in texts]
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


# -- SigLIP towers (no [CLS]): LLaVA-OneVision and Gemma 3 --------------------------------------

VIDEO = "<video>"
BOI, EOI, SOFT = "<boi>", "<eoi>", "<soft>"
#: VOCAB plus the video placeholder and Gemma 3's image markers (begin, soft token, end).
SIGLIP_VOCAB = VOCAB + [VIDEO, BOI, EOI, SOFT]
VIDEO_ID, BOI_ID, EOI_ID, SOFT_ID = (SIGLIP_VOCAB.index(token) for token in (VIDEO, BOI, EOI, SOFT))

#: OneVision crops: 28 px, 4 px patches, so 7 x 7 = 49 patches per crop (odd, like SigLIP's 27 x 27).
OV_IMAGE_SIZE = 28
OV_SIDE = OV_IMAGE_SIZE // PATCH_SIZE
#: OneVision resolutions (height, width) up to 4 x 4 crops; with anyres_max_9 a grid of more than
#: 9 x 1.1^2 crops' worth of patches after unpadding is downsampled (bilinear) inside packing.
OV_PINPOINTS = [[OV_IMAGE_SIZE * i, OV_IMAGE_SIZE * j] for i in range(1, 5) for j in range(1, 5)]
#: Gemma 3: 64 px, 4 px patches, so 16 x 16 = 256 patches, average-pooled 4 x 4 to 4 x 4 = 16 tokens.
GEMMA_IMAGE_SIZE = 64
GEMMA_TOKENS = 16


def _siglip_config(image_size: int, layers: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
    )


def tiny_onevision(
    seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2
) -> LlavaOnevisionForConditionalGeneration:
    """A random LLaVA-OneVision-shaped model: SigLIP tower (last layer, no [CLS]), anyres_max_9 over
    :data:`OV_PINPOINTS`, Qwen2 language model."""
    text = Qwen2Config(**_text_config(text_layers).to_dict() | {"vocab_size": len(SIGLIP_VOCAB)})
    config = LlavaOnevisionConfig(
        vision_config=_siglip_config(OV_IMAGE_SIZE, vision_layers),
        text_config=text,
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(seed)
    return _finish(LlavaOnevisionForConditionalGeneration(config), attn_implementation)


def tiny_gemma3(
    seed: int = 0, attn_implementation: str = "sdpa", vision_layers: int = 2, text_layers: int = 2
) -> Gemma3ForConditionalGeneration:
    """A random Gemma 3-shaped model: SigLIP tower at 64 px (16 x 16 patches) pooled 4 x 4 to 16
    tokens, a Gemma 3 language model with one sliding-window layer and one global layer."""
    text = Gemma3TextConfig(
        vocab_size=len(SIGLIP_VOCAB),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * (text_layers // 2) + ["sliding_attention"] * (text_layers % 2),
        max_position_embeddings=1024,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        initializer_range=0.2,
    )
    config = Gemma3Config(
        vision_config=_siglip_config(GEMMA_IMAGE_SIZE, vision_layers),
        text_config=text,
        mm_tokens_per_image=GEMMA_TOKENS,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        image_token_index=SOFT_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    # Gemma 3 initialises the projection to zeros (all image tokens equal); random weights make pruning matter.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    return _finish(model, attn_implementation)


def tiny_clip_tokenizer() -> CLIPTokenizerFast:
    """CLIP's byte-level BPE without merges: every character is a token (``</w>`` ends a word)."""
    chars = list(bytes_to_unicode().values())
    vocab = {char: i for i, char in enumerate(chars)}
    vocab.update({char + "</w>": len(chars) + i for i, char in enumerate(chars)})
    vocab.update({"<|startoftext|>": 2 * len(chars), "<|endoftext|>": 2 * len(chars) + 1})
    return CLIPTokenizerFast(vocab=vocab, merges=[])


def tiny_clip(model, seed: int = 0, **vision: int) -> CLIPModel:
    """A random CLIP whose vision config is ``model``'s tower's (``vision`` overrides fields), with
    a 77-position text tower over :func:`tiny_clip_tokenizer`'s vocabulary; ``eos_token_id=2``
    as in OpenAI's checkpoints (the text tower pools at the highest id of each segment)."""
    tokenizer = tiny_clip_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=2,
        pad_token_id=1,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config={**model.config.vision_config.to_dict(), **vision}, projection_dim=16
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()
