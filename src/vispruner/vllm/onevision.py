"""vLLM's LLaVA-OneVision, registered over the built-in architecture name, pruning images when asked.

Imported by vLLM only (lazily). Without the ``vispruner`` override every method below hands over
to vLLM's own; with it, each image keeps what the library's transformers path
(:mod:`vispruner.adapters.llava_onevision`) keeps, in the same order, numbered 0, 1, 2, ... as
its default ``positions="compacted"`` does:

* Prompt side: ``get_num_image_tokens`` returns the pruned count of an image of that size
  (:func:`~.layout.onevision_layout`: the base crop's budget, the packed grid's budget for all
  its crops, every newline), so vLLM's own prompt replacement expands each ``<image>`` to it.
* ``embed_multimodal``: vLLM's SigLIP tower runs with :class:`~.received.QkvReceivedCapture` on
  its last layer (the feature layer: vLLM builds the tower up to it). The per-patch features,
  keys and received attention are packed as channels by vLLM's own
  ``_merge_image_patch_embeddings`` (unpadding, the bilinear shrink of anyres_max_9), as the
  library packs them with transformers' ``pack_image_features``: the method chooses among the
  tokens the language model receives, base crop then packed grid, through the library's own
  :func:`~vispruner.adapters.vision_stage.select_tokens`. Kept tokens and every newline are
  returned in prompt order.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..adapters.vision_stage import ImageSelection, _by_piece, select_tokens
from .layout import NEWLINE, Layout, onevision_layout
from .models import RefuseEmbeddings, _Counting, _Pruning, _side
from .received import QkvReceivedCapture
from .settings import settings_for

#: The packing vLLM's OneVision applies to every image (it does not read config.vision_aspect_ratio).
MAX_CROPS = 9

VIDEO_REFUSED = (
    "vispruner's vLLM plugin prunes LLaVA-OneVision images only: videos are not pruned yet, and serving them "
    "unpruned next to pruned images is not offered. Send images, or serve without the vispruner override"
)


def _layout(config: Any, image_size: tuple[int, int]) -> Layout:
    return onevision_layout(image_size, _side(config), config.vision_config.image_size, config.image_grid_pinpoints, MAX_CROPS)


class PrunableOnevisionInfo(_Counting, LlavaOnevisionProcessingInfo):
    def _layout(self, image_size: tuple[int, int]) -> Layout:
        return _layout(self.get_hf_config(), image_size)

    def get_supported_mm_limits(self) -> Any:
        limits = super().get_supported_mm_limits()
        # Videos are refused (validate_num_items): at most 0 per prompt, so that memory profiling does
        # not budget for them either.
        return limits if self._vispruner_settings() is None else {**limits, "video": 0}

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if modality == "video" and num_items > 0 and self._vispruner_settings() is not None:
            raise ValueError(VIDEO_REFUSED)
        super().validate_num_items(modality, num_items)


class PrunableOnevisionProcessor(RefuseEmbeddings, LlavaOnevisionMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunableOnevisionProcessor, info=PrunableOnevisionInfo, dummy_inputs=LlavaOnevisionDummyInputsBuilder
)
class PrunableLlavaOnevisionForConditionalGeneration(_Pruning, LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vispruner_init()

    def embed_multimodal(self, **kwargs: object) -> Any:
        settings = self.vispruner_settings
        if settings is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        if inputs.get("video") is not None:
            raise ValueError(VIDEO_REFUSED)
        image_input = inputs.get("image")
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("vispruner prunes images from their pixels; image embeddings cannot be pruned")
        sizes = image_input["image_sizes"]
        layouts = [_layout(self.config, tuple(size)) for size in sizes.tolist()]
        # Batched pixels may carry padding crops beyond an image's own.
        crops = [image[: layout.crops] for image, layout in zip(image_input["pixel_values"], layouts)]
        needs = settings.method.needs
        capture = QkvReceivedCapture(self._vispruner_attention, "keys" in needs) if needs & {"attention", "keys"} else None
        with capture or nullcontext():
            features = self._image_pixels_to_features(self.vision_tower, torch.cat(crops))
        counts = [image.shape[0] for image in crops]
        # Per patch: the projector's input, the keys, the received attention, packed as the tokens are.
        channels = [features.float()]
        keys = None if capture is None else capture.keys()
        if keys is not None:
            channels.append(keys.flatten(2).float())
        if capture is not None:
            channels.append(capture.scores().unsqueeze(-1))
        packed = torch.cat([self._vispruner_packed(size, image, None) for size, image in zip(sizes, torch.cat(channels, -1).split(counts))])
        width = features.shape[-1]
        candidates = packed[:, :width].to(features.dtype)
        scores = None if capture is None else packed[:, -1]
        keys = None if keys is None else packed[:, width:-1].unflatten(-1, keys.shape[-2:]).to(keys.dtype)
        # vLLM's own tokens of each image (newlines included), and the candidates' among them.
        tokens = [
            self._vispruner_packed(size, image, self.image_newline)
            for size, image in zip(sizes, self.multi_modal_projector(features).split(counts))
        ]
        for image, layout in zip(tokens, layouts):
            if image.shape[0] != layout.packed.numel():
                raise RuntimeError(f"vispruner's layout has {layout.packed.numel()} tokens where vLLM packed {image.shape[0]}")
        projected = torch.cat([image[(layout.packed != NEWLINE).to(image.device)] for image, layout in zip(tokens, layouts)])
        keep, important, replaced = select_tokens(
            settings, [layout.item() for layout in layouts], candidates, scores, keys, projected if "projected" in needs else None
        )
        if replaced is not None:
            # As the library: the tokens a merging method changed are projected from its features.
            changed = (replaced != candidates).any(dim=-1)
            projected = projected.clone()
            projected[changed] = self.multi_modal_projector(replaced[changed].to(candidates.dtype)).to(projected.dtype)
        return self._vispruner_pack(layouts, keep, important, projected)

    def _vispruner_packed(self, size: torch.Tensor, image: torch.Tensor, newline: torch.Tensor | None) -> torch.Tensor:
        """(crops, N, C) per-patch rows of one image -> (P, C) as vLLM packs them (no newline rows
        when ``newline`` is None)."""
        return self._merge_image_patch_embeddings(size, image, image_newline=newline, strategy="spatial_unpad")

    def _vispruner_selection(self, layout: Layout, keep: torch.Tensor, important: torch.Tensor | None) -> ImageSelection:
        """As the library records a OneVision image: one row over its packed tokens, or one per
        piece where the packed grid has the base crop's shape."""
        item = layout.item()
        grid = item.grid if item.uniform else (1, item.size)
        return ImageSelection(
            _by_piece(keep, item).cpu(), None if important is None else _by_piece(important, item).cpu(), grid
        )
