"""vLLM's LLaVA-OneVision, registered over the built-in architecture name, pruning images and videos when asked.

Imported by vLLM only (lazily). Without the ``vispruner`` override every method below hands over
to vLLM's own; with it, each image keeps what the library's transformers path
(:mod:`vispruner.adapters.llava_onevision`) keeps, in the same order, numbered 0, 1, 2, ... as
its default ``positions="compacted"`` does:

* Prompt side: ``get_num_image_tokens`` returns the pruned count of an image of that size
  (:func:`~.layout.onevision_layout`: the base crop's budget, the packed grid's budget for all
  its crops, every newline) and ``get_num_video_tokens`` that of a video (each frame's budget
  among its pooled tokens, the newline), so vLLM's own prompt replacement expands each
  ``<image>`` and ``<video>`` to it.
* ``embed_multimodal``: vLLM's SigLIP tower runs with :class:`~.received.QkvReceivedCapture` on
  its last layer (the feature layer: vLLM builds the tower up to it). The per-patch features,
  keys and received attention are arranged as channels by vLLM's own code, as the language
  model's tokens are (images: ``_merge_image_patch_embeddings``, unpadding and the bilinear
  shrink of anyres_max_9; videos: ``apply_pooling``), as the library arranges them with
  transformers' ``pack_image_features`` and ``apply_pooling``: the method chooses among the
  tokens the language model receives (an image's base crop then its packed grid; a video's
  frames) through the library's own :func:`~vispruner.adapters.vision_stage.select_tokens`.
  Kept tokens and every newline are returned in prompt order.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, Mapping

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..adapters.vision_stage import ImageSelection, select_tokens
from .layout import Layout, onevision_grid_layout, onevision_layout, video_layout
from .models import RefuseEmbeddings, _Counting, _Pruning, _side
from .received import QkvReceivedCapture

#: The packing vLLM's OneVision applies to every image (it does not read config.vision_aspect_ratio).
MAX_CROPS = 9


def _layout(config: Any, image_size: tuple[int, int]) -> Layout:
    return onevision_layout(image_size, _side(config), config.vision_config.image_size, config.image_grid_pinpoints, MAX_CROPS)


class PrunableOnevisionInfo(_Counting, LlavaOnevisionProcessingInfo):
    def _layout(self, image_size: tuple[int, int]) -> Layout:
        return _layout(self.get_hf_config(), image_size)

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        settings = self._vispruner_settings()
        full = super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
        if settings is None:
            return full
        layout = video_layout(num_frames, _side(self.get_hf_config()))
        if int(layout.packed.numel()) != full:
            raise RuntimeError(f"vispruner's layout has {layout.packed.numel()} video tokens where vLLM counts {full}")
        return layout.kept_count(settings)

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int] | None:
        settings = self._vispruner_settings()
        if settings is None:
            return super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        # The encoder cache is sized by the largest item. vLLM's dummy image (a size found for the
        # published checkpoints' unpruned counts) need not have the most pruned tokens, so they are
        # bounded over every grid of crops: at most as many rows as the grid's canvas (unpadding and
        # shrinking only take rows away), at most its tokens and no more than a packed grid keeps
        # (it is shrunk past 1.1^2 x MAX_CROPS crops' worth of patches).
        config = self.get_hf_config()
        side, crop = _side(config), config.vision_config.image_size
        most = math.ceil(1.21 * MAX_CROPS * side**2)

        def bound(height: int, width: int) -> int:
            rows, cols = height // crop * side, width // crop * side
            tokens = min(rows * cols, most)
            return onevision_grid_layout(side, rows, -(-tokens // rows), rows * cols // side**2).kept_count(settings)

        image = max(bound(height, width) for height, width in config.image_grid_pinpoints)
        return {"image": image, "video": self.get_max_video_tokens(seq_len, mm_counts)}

    def _get_max_video_frames(self, max_tokens: int) -> int:
        if self._vispruner_settings() is None:
            return super()._get_max_video_frames(max_tokens)
        # vLLM's memory profiling adds frames while a video's tokens fit max_tokens, which never ends
        # when a per-video budget stops the pruned count growing: frames are counted by their
        # unpruned tokens (as vLLM does without pruning; the tower still sees every frame).
        per_frame = int(video_layout(1, _side(self.get_hf_config())).patches.numel())
        return max((max_tokens - 1) // per_frame, 0)


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
        if self.vispruner_settings is None:
            return super().embed_multimodal(**kwargs)
        out, selections = [], []
        # In the order vLLM gives the modalities (its own embed_multimodal keeps it).
        for modality, given in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if given is None:
                continue
            out += self._vispruner_images(given) if modality == "image" else self._vispruner_videos(given)
            selections += self.vispruner_last
        self.vispruner_last = selections
        return tuple(out)

    def _vispruner_images(self, image_input: Any) -> list[torch.Tensor]:
        if image_input["type"] != "pixel_values":
            raise ValueError("vispruner prunes images from their pixels; image embeddings cannot be pruned")
        sizes = image_input["image_sizes"]
        layouts = [_layout(self.config, tuple(size)) for size in sizes.tolist()]
        # Batched pixels may carry padding crops beyond an image's own.
        crops = [image[: layout.crops] for image, layout in zip(image_input["pixel_values"], layouts)]

        def pack(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
            # vLLM's own packing of each image, without the newline rows (the plugin adds them back).
            return torch.cat([
                self._merge_image_patch_embeddings(size, image, image_newline=None, strategy="spatial_unpad")
                for size, image in zip(sizes, rows.split(counts))
            ])

        return self._vispruner_choose(crops, layouts, pack)

    def _vispruner_videos(self, video_input: Any) -> list[torch.Tensor]:
        videos = list(video_input["pixel_values_videos"])
        layouts = [video_layout(video.shape[0], _side(self.config)) for video in videos]
        rows = self._vispruner_choose(videos, layouts, lambda frames, counts: self.apply_pooling(frames).flatten(0, 1))
        for selection in self.vispruner_last:
            selection.modality = "video"
        return rows

    def _vispruner_choose(
        self, pixels: list[torch.Tensor], layouts: list[Layout], arrange: Callable[[torch.Tensor, list[int]], torch.Tensor]
    ) -> list[torch.Tensor]:
        """Run the tower on each item's (n, 3, H, W) ``pixels`` and return its kept rows.

        ``arrange``: (tower inputs, N, C) per-patch rows and each item's count of tower inputs ->
        (T, C) the candidates of all items in the selection's order, as vLLM arranges its tokens.
        """
        settings = self.vispruner_settings
        needs = settings.method.needs
        capture = QkvReceivedCapture(self._vispruner_attention, "keys" in needs) if needs & {"attention", "keys"} else None
        with capture or nullcontext():
            features = self._image_pixels_to_features(self.vision_tower, torch.cat(pixels))
        counts = [item.shape[0] for item in pixels]
        # Per patch: the projector's input, the keys, the received attention, arranged as the tokens are.
        channels = [features.float()]
        keys = None if capture is None else capture.keys()
        if keys is not None:
            channels.append(keys.flatten(2).float())
        if capture is not None:
            channels.append(capture.scores().unsqueeze(-1))
        arranged = arrange(torch.cat(channels, dim=-1), counts)
        width = features.shape[-1]
        candidates = arranged[:, :width].to(features.dtype)
        scores = None if capture is None else arranged[:, -1]
        keys = None if keys is None else arranged[:, width:-1].unflatten(-1, keys.shape[-2:]).to(keys.dtype)
        # vLLM's own tokens (projected, then arranged).
        projected = arrange(self.multi_modal_projector(features), counts)
        expected = sum(int(layout.patches.numel()) for layout in layouts)
        if projected.shape[0] != expected:
            raise RuntimeError(f"vispruner's layouts have {expected} candidate tokens where vLLM arranged {projected.shape[0]}")
        keep, important, replaced = select_tokens(
            settings, [layout.item() for layout in layouts], candidates, scores, keys, projected if "projected" in needs else None
        )
        if replaced is not None:
            # As the library: the tokens a merging method changed are projected from its features.
            changed = (replaced != candidates).any(dim=-1)
            projected = projected.clone()
            projected[changed] = self.multi_modal_projector(replaced[changed].to(candidates.dtype)).to(projected.dtype)
        return self._vispruner_pack(layouts, keep, important, projected)

    def _vispruner_selection(self, layout: Layout, keep: torch.Tensor, important: torch.Tensor | None) -> ImageSelection:
        """As the library records a OneVision item: one row per piece where the pieces are alike (a
        video's frames; an image whose packed grid has the base crop's shape), else one row."""
        return ImageSelection.of_item(keep.cpu(), None if important is None else important.cpu(), layout.item())
