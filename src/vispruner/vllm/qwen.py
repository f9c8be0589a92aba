"""vLLM's Qwen2.5-VL and Qwen3-VL, registered over the built-in architecture names, pruning images when asked.

Imported by vLLM only (lazily). Without the ``vispruner`` override every method below hands
over to vLLM's own; with it, each image keeps K merged tokens at their original 3D M-RoPE
positions, and decoding continues after the unpruned prompt, as the library's transformers path
(:mod:`vispruner.adapters.qwen_vision`) does:

* Prompt side: each image's placeholder run holds the kept count (:meth:`Layout.kept_count`), so
  the prompt vLLM schedules is text + K per image. Videos, image embeddings, and prompts that end
  with an image are refused (see the messages).
* ``get_mrope_input_positions``: the unpruned layout (text after an image continues after the
  image's full extent); the K image slots hold the image's first position for now.
* ``embed_multimodal``: vLLM's tower runs with :class:`~.received.KernelInputTap` (the signal) and
  a pre-hook on its merger where the library's :func:`select_tokens` chooses; per image the kept
  rows are returned with the 4 position columns of vLLM's video pruning ((t, h, w) within the
  image, then the grid width). Qwen3-VL's tower returns each token's deepstack features
  concatenated to it, so they follow the same keep mask.
* ``recompute_mrope_positions`` (called by the runner through :mod:`.runner`'s hook): writes
  each kept token's position, image start + its (t, h, w), chunk by chunk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from ..adapters.vision_stage import ImageSelection, select_tokens
from . import runner
from .layout import Layout
from .models import RefuseEmbeddings, refuse_compiled_tower
from .received import KernelInputTap
from .settings import settings_for

#: Position columns appended to each kept row (vLLM's video pruning convention: t, h, w, grid width).
POSITION_COLUMNS = 4

VIDEO_REFUSED = (
    "vispruner's vLLM plugin prunes Qwen-VL images only: a video would need K tokens per temporal group at "
    "their 3D positions, which the plugin does not build yet, and serving it unpruned next to pruned images is "
    "not offered. Send images, or serve without the vispruner override"
)


def _image_layout(grid: list[int], merge: int) -> Layout:
    """One image of merged grid rows x cols as the selection sees it (one piece, raster order)."""
    _, height, width = grid
    rows, cols = height // merge, width // merge
    every = torch.arange(rows * cols)
    return Layout(1, every, ((rows, cols),), every)


class _RefusingVideos:
    """Processing-info mixin."""

    def get_supported_mm_limits(self) -> Any:
        limits = super().get_supported_mm_limits()
        if settings_for(self.get_hf_config()) is None:
            return limits
        # Videos are refused (validate_num_items): at most 0 per prompt, so that memory profiling does
        # not budget for them either (the modality stays known to the processor's argument routing).
        return {**limits, "video": 0} if "video" in limits else limits

    def validate_num_items(self, modality: str, num_items: int) -> None:
        if modality == "video" and num_items > 0 and settings_for(self.get_hf_config()) is not None:
            raise ValueError(VIDEO_REFUSED)
        super().validate_num_items(modality, num_items)


class _TextLast:
    """Dummy-inputs mixin."""

    def get_dummy_text(self, mm_counts: Any) -> str:
        text = super().get_dummy_text(mm_counts)
        if settings_for(self.info.get_hf_config()) is None:
            return text
        # The profiling prompt must not end with an image, which the processor refuses.
        return text + self.info.get_tokenizer().eos_token


class _KeptPlaceholders(RefuseEmbeddings):
    """Processor mixin: each image's placeholder run holds its kept count."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.get_hf_config()
        settings = settings_for(config)
        if settings is None:
            return updates
        merge = config.vision_config.spatial_merge_size

        def kept(item: int) -> list[int]:
            grid = out_mm_kwargs["image"][item]["image_grid_thw"].data.tolist()
            return [config.image_token_id] * _image_layout(grid, merge).kept_count(settings)

        return [
            PromptReplacement(modality="image", target=update.target, replacement=kept) if update.modality == "image" else update
            for update in updates
        ]

    def apply(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # Checked before vLLM's processor caches the request's images (a request refused after that
        # would leave its images cached on one side of vLLM's processor cache only).
        config = self.info.get_hf_config()
        if settings_for(config) is not None and inputs.prompt and inputs.prompt[-1] == config.image_token_id:
            raise ValueError(
                "vispruner: a pruned Qwen-VL prompt must not end with an image: decoding continues after the "
                "unpruned image's extent, which vLLM's runner rebuilds from the prompt's last text token. Add "
                "text after the image (chat templates do)"
            )
        return super().apply(inputs, *args, **kwargs)


class _Pruning:
    """Model mixin: see the module doc."""

    def _vispruner_init(self, vllm_config: Any) -> None:
        self.vispruner_settings = settings_for(self.config)
        #: Per image of the last pruned ``embed_multimodal`` call, what was kept.
        self.vispruner_last: list[ImageSelection] | None = None
        if self.vispruner_settings is not None:
            _refuse_unsupported(self, vllm_config)
            self._vispruner_patch = runner.enable_position_hook(self.multimodal_config)

    # -- prompt positions ----------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        if self.vispruner_settings is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        parts, start, next_position = [], 0, 0
        merge = self.config.vision_config.spatial_merge_size
        for feature in sorted(mm_features, key=lambda feature: feature.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(VIDEO_REFUSED)
            t, height, width = feature.data["image_grid_thw"].data.tolist()
            rows, cols, offset = height // merge, width // merge, feature.mm_position.offset
            text = offset - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            first = next_position + text
            kept = feature.mm_position.length
            parts.append(np.full((3, kept), first))  # recompute_mrope_positions adds each token's (t, h, w)
            next_position = first + max(t, rows, cols)  # as without pruning
            start = offset + kept
        text = len(input_tokens) - start
        parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(parts, axis=1)
        return torch.from_numpy(np.ascontiguousarray(positions)).long(), int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(
        self, input_ids: Any, multimodal_embeddings: Any, mrope_positions: torch.Tensor, num_computed_tokens: int
    ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        if self.vispruner_settings is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
        positions = mrope_positions.clone()
        ids = torch.as_tensor(input_ids).to(positions.device)
        if len(multimodal_embeddings):
            # The rows given are those of the image slots from num_computed_tokens on, in order (an
            # image cut by chunked prefill gives its rows in this chunk).
            offsets = torch.cat([rows[:, -POSITION_COLUMNS:-1] for rows in multimodal_embeddings]).long().T.to(positions.device)
            slots = (ids == self.config.image_token_id).nonzero().flatten()
            slots = slots[slots >= num_computed_tokens][: offsets.shape[1]]
            # Row 0 of an image slot stays the image's first position (images have t = 0): rerunnable.
            positions[:, slots] = positions[0, slots] + offsets
        embeddings = [rows[:, :-POSITION_COLUMNS] for rows in multimodal_embeddings]
        return embeddings, positions, int(positions.max()) + 1 - ids.numel()

    # -- the tower ----------------------------------------------------------------------------------

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
        visual, merge = self.visual, self.visual.spatial_merge_size
        grids = image_input["image_grid_thw"].tolist()
        layouts = [_image_layout(grid, merge) for grid in grids]
        items = [layout.item() for layout in layouts]
        needs = settings.method.needs
        attention = visual.blocks[-1].attn if needs & {"attention", "keys"} else None
        segments = torch.tensor([0] + [h * w for t, h, w in grids for _ in range(t)]).cumsum(0)
        tap = KernelInputTap(visual.merger, attention, merge**2, self._vispruner_order(grids), "keys" in needs, segments)
        chosen: dict[str, Any] = {}

        def on_features(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            if "keep" in chosen:  # the projection below runs the merger, and its norm, again
                return None
            chosen["keep"] = None
            features = tap.features(args)
            projected = tap.project(args) if "projected" in needs else None
            keep, important, replaced = select_tokens(
                settings, items, features, tap.attention(), tap.keys(), projected, shared_piece_budget=True
            )
            chosen.update(keep=keep, important=important)
            return None if replaced is None else tap.substitute(args, replaced.to(features.dtype))

        # vLLM's compile wrapper calls the merger's forward directly (module hooks on it never run);
        # its first norm receives the merger's input as an ordinary call.
        handle = self._vispruner_merger_norm().register_forward_pre_hook(on_features)
        try:
            with tap:
                embeddings = self._process_image_input(image_input)
        finally:
            handle.remove()
        out, selections, start = [], [], 0
        for rows, grid, layout in zip(embeddings, grids, layouts):
            size = rows.shape[0]
            keep = chosen["keep"][start : start + size].to(rows.device)
            positions = compute_mrope_for_media(torch.tensor(grid), merge).to(rows.device)[keep]
            out.append(torch.cat([rows[keep], positions.to(rows.dtype)], dim=1))
            important = None if chosen["important"] is None else chosen["important"][start : start + size]
            selections.append(
                ImageSelection(keep.view(1, -1).cpu(), None if important is None else important.view(1, -1).cpu(), layout.shapes[0])
            )
            start += size
        self.vispruner_last = selections
        return tuple(out)


class PrunableQwen2_5_VLInfo(_RefusingVideos, Qwen2_5_VLProcessingInfo):
    pass


class PrunableQwen2_5_VLDummyInputs(_TextLast, Qwen2_5_VLDummyInputsBuilder):
    pass


class PrunableQwen2_5_VLProcessor(_KeptPlaceholders, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunableQwen2_5_VLProcessor, info=PrunableQwen2_5_VLInfo, dummy_inputs=PrunableQwen2_5_VLDummyInputs
)
class PrunableQwen2_5_VLForConditionalGeneration(_Pruning, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vispruner_init(vllm_config)

    def _vispruner_merger_norm(self) -> torch.nn.Module:
        return self.visual.merger.ln_q

    def _vispruner_order(self, grids: list[list[int]]) -> torch.Tensor:
        """argsort of the tower's window order: the merge groups in placeholder order."""
        visual = self.visual
        parts, offset = [], 0
        merge = visual.spatial_merge_size
        for t, h, w in grids:
            index, _ = visual.get_window_index_thw(t, h, w)
            parts.append(index + offset)
            offset += t * (h // merge) * (w // merge)
        return torch.argsort(torch.cat(parts))


class PrunableQwen3VLInfo(_RefusingVideos, Qwen3VLProcessingInfo):
    pass


class PrunableQwen3VLDummyInputs(_TextLast, Qwen3VLDummyInputsBuilder):
    pass


class PrunableQwen3VLProcessor(_KeptPlaceholders, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(
    PrunableQwen3VLProcessor, info=PrunableQwen3VLInfo, dummy_inputs=PrunableQwen3VLDummyInputs
)
class PrunableQwen3VLForConditionalGeneration(_Pruning, Qwen3VLForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vispruner_init(vllm_config)

    def _vispruner_merger_norm(self) -> torch.nn.Module:
        return self.visual.merger.norm

    def _vispruner_order(self, grids: list[list[int]]) -> None:
        return None  # no windows: the tower runs in placeholder order


def _refuse_unsupported(model: Any, vllm_config: Any) -> None:
    """What would bypass the hooks or split the batch the selection sees: refused at start-up."""
    rate = model.multimodal_config.video_pruning_rate
    if rate:
        raise ValueError(
            f"video_pruning_rate={rate} switches on vLLM's own video pruning (EVS), which shares the position hook "
            "the plugin uses for images and would prune videos by another rule, while the plugin refuses videos. "
            "Serve with the vispruner override or with video_pruning_rate, not both"
        )
    visual = model.visual
    windowed = getattr(visual, "fullatt_block_indexes", None)
    if windowed is not None and len(visual.blocks) - 1 not in windowed:
        raise ValueError(
            "vispruner scores Qwen2.5-VL tokens by the attention they receive in the tower's last block, which must "
            f"attend over whole images; this tower's full-attention blocks are {windowed} of "
            f"{len(visual.blocks)}"
        )
    if model.use_data_parallel:
        raise ValueError(
            "mm_encoder_tp_mode='data' splits a batch's images over ranks before the tower, so the selection would "
            "not see them together; serve with the default mm_encoder_tp_mode when pruning with vispruner"
        )
    refuse_compiled_tower(vllm_config)
