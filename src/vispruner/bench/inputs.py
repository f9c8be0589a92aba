"""Synthetic benchmark inputs: random pixels and random text ids around the image placeholders.

No processor or tokenizer is needed, so presets and checkpoints are benchmarked the same way;
costs depend on shapes, not on content.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from ..eval.budgets import GEMMA4_SIDE_TOKENS, square_side

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


#: Merged tokens per side of the Qwen-VL benchmark image: 24 x 24 = 576, LLaVA-1.5's count.
QWEN_SIDE_TOKENS = 24


def is_qwen(model: "PreTrainedModel") -> bool:
    """Whether ``model`` is Qwen-VL-shaped (patches merged 2 x 2, ``image_grid_thw`` input)."""
    return hasattr(model.config.vision_config, "spatial_merge_size")


def is_gemma4(model: "PreTrainedModel") -> bool:
    """Whether ``model`` is Gemma 4-shaped (patches with positions pooled k x k, no fixed size)."""
    return hasattr(model.config.vision_config, "pooling_kernel_size")


#: Gemma 4's processor pads every image to its token budget's patches (default 280 tokens).
GEMMA4_BUDGET = 280


def is_next(model: "PreTrainedModel") -> bool:
    """Whether ``model`` is LLaVA-NeXT-shaped (anyres crops, ``image_sizes`` input)."""
    return getattr(model.config, "image_grid_pinpoints", None) is not None


def default_image_size(model: "PreTrainedModel") -> tuple[int, int]:
    """(height, width) of the benchmark image.

    LLaVA: the tower's square input. LLaVA-NeXT: the largest grid resolution, the case with the
    most crops (672 x 672 on the 7B checkpoints: the base image plus 2 x 2 crops, as in the
    paper's efficiency table). Qwen-VL: the square image of 24 x 24 = 576 merged tokens (672 px
    for Qwen2.5-VL's 14 px patches, 768 px for Qwen3-VL's 16 px), as many as LLaVA-1.5's. Gemma 4:
    the square image its processor makes at its default budget (768 px, 16 x 16 tokens).
    """
    if is_gemma4(model):
        vision = model.config.vision_config
        side = GEMMA4_SIDE_TOKENS * vision.patch_size * vision.pooling_kernel_size
        return side, side
    if is_qwen(model):
        vision = model.config.vision_config
        side = QWEN_SIDE_TOKENS * vision.patch_size * vision.spatial_merge_size
        return side, side
    if is_next(model):
        height, width = max(model.config.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
        return int(height), int(width)
    side = square_side(model.config.vision_config.image_size)
    return side, side


def image_inputs(
    model: "PreTrainedModel", batch_size: int, image_size: tuple[int, int], seed: int = 0
) -> dict[str, "torch.Tensor"]:
    """``pixel_values`` (and ``image_sizes`` for LLaVA-NeXT and Mistral 3, ``image_grid_thw`` for
    Qwen-VL, ``pixel_attention_mask`` for Idefics3, ``image_position_ids`` for Gemma 4) for one
    image per prompt (Idefics3: one tile)."""
    import torch

    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    generator = torch.Generator().manual_seed(seed)
    if is_gemma4(model):
        # Patches in raster order with their (x, y), padded (position -1) as the processor pads.
        vision = model.config.vision_config
        rows, cols = image_size[0] // vision.patch_size, image_size[1] // vision.patch_size
        padded = max(GEMMA4_BUDGET * vision.pooling_kernel_size**2, rows * cols)
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        positions = torch.full((padded, 2), -1)
        positions[: rows * cols] = torch.stack([xs.flatten(), ys.flatten()], dim=-1)
        pixels = torch.zeros(batch_size, padded, 3 * vision.patch_size**2)
        pixels[:, : rows * cols] = torch.rand(batch_size, rows * cols, pixels.shape[-1], generator=generator)
        return {"pixel_values": pixels, "image_position_ids": positions.expand(batch_size, -1, -1).clone()}
    if is_qwen(model):
        vision = model.config.vision_config
        rows, cols = image_size[0] // vision.patch_size, image_size[1] // vision.patch_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "pixel_values": torch.randn(batch_size * rows * cols, width, generator=generator),
            "image_grid_thw": torch.tensor([[1, rows, cols]] * batch_size),
        }
    side = square_side(model.config.vision_config.image_size)
    if not is_next(model):
        pixels = {"pixel_values": torch.randn(batch_size, 3, side, side, generator=generator)}
        if getattr(model.config, "spatial_merge_size", None) is not None:  # Mistral 3: each image's own size
            pixels["image_sizes"] = torch.tensor([[side, side]] * batch_size)
        if getattr(model.config, "scale_factor", None) is not None:  # Idefics3 / SmolVLM: tiles per prompt
            pixels["pixel_values"] = pixels["pixel_values"].unsqueeze(1)
            pixels["pixel_attention_mask"] = torch.ones(batch_size, 1, side, side, dtype=torch.long)
        return pixels
    crops = image_size_to_num_patches(list(image_size), model.config.image_grid_pinpoints, side)
    return {
        "pixel_values": torch.randn(batch_size, crops, 3, side, side, generator=generator),
        "image_sizes": torch.tensor([list(image_size)] * batch_size),
    }


def placeholders_per_image(model: "PreTrainedModel", images: dict[str, "torch.Tensor"]) -> int:
    """Visual tokens the unpatched ``model`` makes of one image (run once: it runs the tower).

    Asking the model itself keeps LLaVA-NeXT's unpadding and newline tokens exactly as the stock
    model counts them.
    """
    import torch

    if is_qwen(model):
        return int(images["image_grid_thw"][0].prod()) // model.config.vision_config.spatial_merge_size**2
    first = {name: value[:1].to(model.device) for name, value in images.items()}
    first["pixel_values"] = first["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        features = model.model.get_image_features(**first, return_dict=True).pooler_output
    return int(features[0].shape[0])


def prompt_inputs(
    model: "PreTrainedModel",
    images: dict[str, "torch.Tensor"],
    visual_tokens: int,
    text_tokens: int,
    seed: int = 0,
) -> dict[str, "torch.Tensor"]:
    """Model inputs: per prompt, BOS, ``visual_tokens`` image placeholders, then random text.

    ``text_tokens`` counts every non-image token (BOS included). No padding: all prompts have the
    same length, so every row of the batch costs the same.
    """
    import torch

    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 1:
        raise ValueError(f"text_tokens must be an integer >= 1; got {text_tokens!r}")
    batch = images["image_grid_thw"].shape[0] if is_qwen(model) else images["pixel_values"].shape[0]
    text = model.config.text_config
    image_id = model.config.image_token_id
    generator = torch.Generator().manual_seed(seed + 1)
    # Ordinary ids only: skip the first few (special tokens) and the image placeholder id.
    words = torch.randint(3, text.vocab_size - 1, (batch, text_tokens - 1), generator=generator)
    words[words >= image_id] += 1
    bos = torch.full((batch, 1), text.bos_token_id if text.bos_token_id is not None else 1)
    placeholders = torch.full((batch, visual_tokens), image_id)
    input_ids = torch.cat([bos, placeholders, words], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **images}
    if is_qwen(model) or is_gemma4(model):
        # Gemma 4: its image tokens attend to each other both ways in the sliding-window layers.
        inputs["mm_token_type_ids"] = (input_ids == image_id).int()
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        # Gemma 3: its image tokens attend to each other both ways, marked by token type 1.
        inputs["token_type_ids"] = (input_ids == image_id).long()
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return {name: value.to(model.device) for name, value in inputs.items()}
