"""The Qwen testbed VLM: a small stock ``Qwen2_5_VLForConditionalGeneration`` with an offline processor.

The vision tower has no [CLS]: 16 x 16 patches of 7 px on the 112 px scenes, window attention
(windows of 4 x 4 merged tokens) in every block but the last, which attends over the whole image,
then Qwen2.5-VL's 2 x 2 patch merger, so the language model receives 8 x 8 = 64 tokens of 14 px,
the same grid as the LLaVA testbed's patches. The language model is a Qwen2 decoder with M-RoPE:
image tokens carry their (row, column) position. Tokenizer and chat template are the LLaVA
testbed's, plus a video placeholder so that no question word is ever taken for a video token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL, build_tokenizer
from .scenes import IMAGE_SIZE

if TYPE_CHECKING:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

WEIGHTS = Path(__file__).parent / "weights_qwen"
PATCH_SIZE = 7
MERGE_SIZE = 2
#: Merged tokens per image (the language model's visual tokens): (112 / 14) ** 2.
NUM_TOKENS = (IMAGE_SIZE // (PATCH_SIZE * MERGE_SIZE)) ** 2
VIDEO_TOKEN = "<video>"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def build_image_processor() -> Any:
    """Qwen2-VL's image processor (PIL backend), held at exactly 112 x 112 px."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )


def assemble_processor(image_processor: Any, tokenizer: Any, chat_template: str) -> Qwen2_5_VLProcessor:
    """A stock ``Qwen2_5_VLProcessor`` over these parts, with no video processor.

    transformers 5.x cannot construct this class without torchvision: its argument check looks
    the video processor's base class up in a mapping that is a placeholder without torchvision,
    even when no video processor is given. The instance is therefore filled in directly, with
    the attributes its ``__init__`` would set; its ``__call__`` is the stock one.
    """
    from transformers import Qwen2_5_VLProcessor

    processor = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    processor.chat_template = chat_template
    processor.image_processor = image_processor
    processor.tokenizer = tokenizer
    processor.video_processor = None
    processor.image_token = IMAGE_TOKEN
    processor.video_token = VIDEO_TOKEN
    processor.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    processor.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    return processor


def build_processor() -> Qwen2_5_VLProcessor:
    """The processor of a fresh Qwen testbed."""
    # video_token named too: without it vLLM's processor falls back to Qwen's "<|video_pad|>",
    # which is not in this vocabulary.
    tokenizer = build_tokenizer(special=(*SPECIAL, VIDEO_TOKEN), named={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN})
    return assemble_processor(build_image_processor(), tokenizer, CHAT_TEMPLATE)


def save_processor(processor: Qwen2_5_VLProcessor, path: Path) -> None:
    """Image processor, tokenizer and chat template, as a Qwen2.5-VL checkpoint folder holds them."""
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    (path / CHAT_TEMPLATE_FILE).write_text(processor.chat_template, encoding="utf-8")
    # What AutoProcessor reads to pick the class, where torchvision lets it construct one.
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}, indent=2) + "\n")


def load_processor(path: Path) -> Qwen2_5_VLProcessor:
    """The processor saved at ``path`` by :func:`save_processor`, offline."""
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return assemble_processor(image_processor, tokenizer, (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"))


def build_model(processor: Qwen2_5_VLProcessor, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A freshly initialised Qwen testbed model (about 1.2 M parameters) for ``processor``'s vocabulary."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = processor.tokenizer
    hidden = 128
    vision = {
        "depth": 4,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_heads": 4,
        "in_channels": 3,
        "out_hidden_size": hidden,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "window_size": 4 * PATCH_SIZE * MERGE_SIZE,  # pixels: 4 x 4 merged tokens per window
        "fullatt_block_indexes": [3],  # the last block sees the whole image, as in Qwen2.5-VL-7B
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        # The LLaVA testbed's decoder shape and norm, so that training can start from it (train.py).
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256,
        # M-RoPE: the 16 rotary frequencies of a 32-wide head split between time, row and column.
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()
