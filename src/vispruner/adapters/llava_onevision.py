"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP crops packed anyres_max_9, and videos.

Images: the base crop and a grid of high-resolution crops go through the tower together; the
model's own ``pack_image_features`` unpads the grid, shrinks it (bilinear) when it holds more
than about nine crops' worth of patches, and ends each grid row with a newline token. A prompt
with several images gets each image's base crop only, followed by one newline. Videos: the
model's own ``apply_pooling`` pools every frame's patches (bilinear, to half the side rounded
up; 2 x 2 averages when the side is even), with one newline after the last frame.

The method chooses among the tokens the language model receives: the received attention, the
projector's input and the keys are packed or pooled by that same code ("pack float scores, then
choose after packing"), and the choice is made at an identity module inserted after it. Pieces:
an image's base crop, then its packed grid (standing for its crops in a per-crop budget); a
video's frames. Newline tokens are always kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from .clip_projector import encoder_layers, feature_attention
from .siglip import PooledTap, changed_rows
from .vision_stage import Family, Item, Modality

IMAGE = Modality(
    name="image",
    encoder="get_image_features",
    pixels="pixel_values",
    token_id="image_token_id",
    arguments=("image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "batch_num_images"),
)
VIDEO = Modality(
    name="video",
    encoder="get_video_features",
    pixels="pixel_values_videos",
    token_id="video_token_id",
    arguments=("vision_feature_layer", "vision_feature_select_strategy"),
)


class OnevisionVision:
    """:class:`~.vision_stage.VisionSide` of one LLaVA-OneVision model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = encoder_layers(model.model.vision_tower)
        vision = model.config.vision_config
        self.side = vision.image_size // vision.patch_size

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        if modality.name == "video":
            videos, frames = arguments["pixel_values_videos"].shape[:2]
            pooled = math.ceil(self.side / 2)
            return [Item(frames, (pooled, pooled))] * videos
        items = []
        base = (self.side, self.side)
        for crops, is_token in zip(self.crops(arguments), self.token_rows(arguments)):
            if crops == 1:
                items.append(Item(1, base))
                continue
            grid = is_token[self.side**2 :]
            rows = int((~grid).sum())  # one newline per row
            cols = int(grid.sum()) // rows
            items.append(Item(2, base, shapes=(base, (rows, cols)), crops=(1, crops - 1)))
        return items

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> PooledTap:
        # SigLIP has no [CLS]: the features are every patch ("full").
        attention = feature_attention(self.model, self.layers, arguments, "full")
        attention = attention if needs & {"attention", "keys"} else None
        if modality.name == "video":
            return VideoTap(self.model, attention, keep_keys="keys" in needs)
        return ImageTap(self, attention, keep_keys="keys" in needs, arguments=arguments)

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        if modality.name == "video":
            return [torch.cat([keep.flatten(), keep.new_ones(1)]) for keep in keeps]
        packed = []
        for keep, is_token in zip(keeps, self.token_rows(arguments)):
            flags = torch.ones_like(is_token)
            flags[is_token] = keep.flatten().to(is_token.device)
            packed.append(flags)
        return packed

    def crops(self, arguments: dict[str, Any]) -> list[int]:
        """Crops of each image in the tower's batch, as the model counts them."""
        config = self.model.config
        sizes = arguments["image_sizes"]
        counts = arguments.get("batch_num_images")
        alone = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size) if one else 1
            for size, one in zip(sizes, alone)
        ]

    def token_rows(self, arguments: dict[str, Any]) -> list[torch.Tensor]:
        """Per image, (P,) bool over its placeholder tokens: True for a patch token, False for a newline.

        The model's own packing of a ones channel with a zero newline: unpadding drops and
        downsampling interpolates ones, which stay ones.
        """
        device = arguments["image_sizes"].device
        ones = [torch.ones(crops, self.side**2, 1, device=device) for crops in self.crops(arguments)]
        packed, _ = self.model.model.pack_image_features(
            ones,
            arguments["image_sizes"],
            image_newline=torch.zeros(1, device=device),
            vision_aspect_ratio=_aspect_ratio(self.model, arguments),
        )
        return [rows[:, 0] > 0.5 for rows in packed]


def _aspect_ratio(model: nn.Module, arguments: dict[str, Any]) -> str:
    return arguments.get("vision_aspect_ratio") or model.config.vision_aspect_ratio


class VideoTap(PooledTap):
    """The choice is made after ``apply_pooling``, on the pooled (videos * frames, n, D) tokens."""

    def __init__(self, model: nn.Module, attention: nn.Module | None, keep_keys: bool) -> None:
        super().__init__(model, attention, keep_keys)
        self.module = nn.Identity()

    def __enter__(self) -> "VideoTap":
        super().__enter__()
        self._pool = self.model.model.apply_pooling
        self.patch.wrap(self.model.model, "apply_pooling", lambda pool, tokens: self.module(pool(tokens)))
        return self

    def arrange(self, channels: torch.Tensor) -> torch.Tensor:
        return self._pool(channels).flatten(0, 1)

    def project(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        return inputs[0].flatten(0, 1)

    def substitute(self, inputs: tuple[Any, ...], features: torch.Tensor) -> tuple[Any, ...]:
        changed = changed_rows(self, inputs, features)
        tokens = inputs[0].flatten(0, 1).clone()
        tokens[changed] = self.model.model.multi_modal_projector.forward(features[changed]).to(tokens.dtype)
        return (tokens.view_as(inputs[0]),)


class ImageTap(PooledTap):
    """The choice is made after ``pack_image_features``, on each image's packed tokens, newlines aside."""

    def __init__(
        self, vision: OnevisionVision, attention: nn.Module | None, keep_keys: bool, arguments: dict[str, Any]
    ) -> None:
        super().__init__(vision.model, attention, keep_keys)
        self.module = nn.Identity()
        self._arguments = arguments
        self._crops = vision.crops(arguments)
        self._flags = vision.token_rows(arguments)

    def __enter__(self) -> "ImageTap":
        super().__enter__()
        self._pack = self.model.model.pack_image_features

        def packed(pack: Any, *args: Any, **kwargs: Any) -> Any:
            features, lengths = pack(*args, **kwargs)
            return self.module(features), lengths

        self.patch.wrap(self.model.model, "pack_image_features", packed)
        return self

    def arrange(self, channels: torch.Tensor) -> torch.Tensor:
        packed, _ = self._pack(
            list(channels.split(self._crops)),
            self._arguments["image_sizes"],
            image_newline=channels.new_zeros(channels.shape[-1]),
            vision_aspect_ratio=_aspect_ratio(self.model, self._arguments),
        )
        return torch.cat(packed)[torch.cat(self._flags).to(channels.device)]

    def project(self, inputs: tuple[Any, ...]) -> torch.Tensor:
        return torch.cat([image[flags] for image, flags in zip(inputs[0], self._token_flags(inputs))])

    def substitute(self, inputs: tuple[Any, ...], features: torch.Tensor) -> tuple[Any, ...]:
        changed = changed_rows(self, inputs, features)
        tokens = self.project(inputs).clone()
        tokens[changed] = self.model.model.multi_modal_projector.forward(features[changed]).to(tokens.dtype)
        images = []
        start = 0
        for image, flags in zip(inputs[0], self._token_flags(inputs)):
            image = image.clone()
            count = int(flags.sum())
            image[flags] = tokens[start : start + count]
            start += count
            images.append(image)
        return (images,)

    def _token_flags(self, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
        return [flags.to(image.device) for image, flags in zip(inputs[0], self._flags)]


FAMILY = Family(
    name="LLaVA-OneVision",
    model_class=LlavaOnevisionForConditionalGeneration,
    example="llava-hf/llava-onevision-qwen2-7b-ov-hf",
    vision=OnevisionVision,
    modalities=(IMAGE, VIDEO),
    language_stage=(
        "its anyres images are packed into pieces of different sizes (a base crop, a downsampled grid), "
        "which the LLM-stage grouping does not handle yet"
    ),
)
