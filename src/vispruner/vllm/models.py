"""vLLM's LLaVA-1.5 and LLaVA-NeXT, registered over the built-in architecture names, pruning when asked.

Imported by vLLM only (lazily, when it resolves one of these architectures). Without the
``vispruner`` override every method below hands over to vLLM's own; with it:

* Prompt side (the engine's input processor): the processing info's ``get_num_image_tokens``
  returns the pruned count (:class:`~.layout.Layout`), so vLLM's own prompt replacement expands
  each ``<image>`` into that many placeholders and the language model numbers the kept tokens
  0, 1, 2, ... as the library's default ``positions="compacted"`` does.
* Model side: ``embed_multimodal`` runs vLLM's tower with a hook that scores only the [CLS]
  row of the feature layer (:mod:`.cls_row`), lets the method choose through the library's own
  :func:`~vispruner.adapters.vision_stage.select_tokens`, projects, and returns per image only
  the kept rows (plus LLaVA-NeXT's newlines) in prompt order.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping

import torch
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import EmbeddingItems

from ..adapters.vision_stage import ImageSelection, Settings, select_tokens
from .cls_row import QkvClsCapture
from .layout import Layout, llava_layout, llava_next_layout
from .settings import settings_for


def _side(hf_config: Any) -> int:
    vision = hf_config.vision_config
    return vision.image_size // vision.patch_size


class _Counting:
    """Processing-info mixin: the pruned placeholder count of an image of the given size."""

    def _vispruner_settings(self) -> Settings | None:
        return settings_for(self.get_hf_config())

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        settings = self._vispruner_settings()
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if settings is None:
            return full
        layout = self._layout((image_height, image_width))
        if int(layout.packed.numel()) != full:
            raise RuntimeError(f"vispruner's layout has {layout.packed.numel()} tokens where vLLM counts {full}")
        _check_grid(settings, layout)
        return layout.kept_count(settings)


class PrunableLlavaInfo(_Counting, LlavaProcessingInfo):
    def _layout(self, image_size: tuple[int, int]) -> Layout:
        return llava_layout(_side(self.get_hf_config()))


class PrunableLlavaNextInfo(_Counting, LlavaNextProcessingInfo):
    def _layout(self, image_size: tuple[int, int]) -> Layout:
        config = self.get_hf_config()
        return llava_next_layout(image_size, _side(config), config.vision_config.image_size, config.image_grid_pinpoints)


class RefuseEmbeddings:
    """Processor mixin: precomputed image (or video) embeddings cannot be pruned (no tower runs)."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Any, out_mm_kwargs: Any) -> Any:
        if settings_for(self.info.get_hf_config()) is not None and any(
            isinstance(items, EmbeddingItems) for items in mm_items.values()
        ):
            raise ValueError(
                "vispruner prunes images and videos from their pixels; image or video embeddings cannot be pruned "
                "(pass the image or video, or serve without the vispruner override)"
            )
        return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)


def refuse_compiled_tower(vllm_config: Any) -> None:
    """A tower run compiled or as a CUDA graph would run past the plugin's hooks: refused at start-up."""
    compilation = vllm_config.compilation_config
    for name in ("compile_mm_encoder", "cudagraph_mm_encoder"):
        if getattr(compilation, name, False):
            raise ValueError(
                f"compilation_config.{name}=True runs the vision tower compiled or as a CUDA graph, past the hooks "
                "that read its attention; leave it off when pruning with vispruner"
            )


class PrunableLlavaProcessor(RefuseEmbeddings, LlavaMultiModalProcessor):
    pass


class PrunableLlavaNextProcessor(RefuseEmbeddings, LlavaNextMultiModalProcessor):
    pass


def _llava_info(ctx: Any) -> Any:
    stock = _build_llava_or_pixtral_hf_info(ctx)
    return PrunableLlavaInfo(ctx) if isinstance(stock, LlavaProcessingInfo) else stock


def _llava_processor(info: Any, dummy_inputs: Any) -> Any:
    from vllm.model_executor.models.llava import _build_llava_or_pixtral_hf_processor

    if isinstance(info, PrunableLlavaInfo):
        return PrunableLlavaProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


def _check_grid(settings: Settings, layout: Layout) -> None:
    """Methods that need the patch grid cannot take a per-image unit whose pieces differ in width."""
    if "grid" in settings.method.needs and settings.budget == "per_image" and len({c for _, c in layout.shapes}) > 1:
        raise ValueError(
            f"method {settings.method.name!r} needs one patch grid per budget unit; with budget='per_image' this "
            "image's crops, unpadded, differ in width (use budget='per_crop')"
        )


class _Pruning:
    """Model mixin: ``embed_multimodal`` keeps what the method chooses."""

    def _vispruner_init(self) -> None:
        self.vispruner_settings = settings_for(self.config)
        #: Per image of the last pruned ``embed_multimodal`` call, what was kept (as the library's
        #: ``last_selection``: masks over each piece's candidate patches).
        self.vispruner_last: list[ImageSelection] | None = None
        if self.vispruner_settings is not None:
            vision = self.vision_tower.vision_model
            # vLLM builds the tower only up to the feature layer: its last layer feeds the projector.
            self._vispruner_attention = vision.encoder.layers[-1].self_attn

    def embed_multimodal(self, **kwargs: object) -> Any:
        settings = self.vispruner_settings
        if settings is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("vispruner prunes images from their pixels; image embeddings cannot be pruned")
        crops, layouts = self._vispruner_crops(image_input)
        needs = settings.method.needs
        capture = QkvClsCapture(self._vispruner_attention, "keys" in needs) if needs & {"attention", "keys"} else None
        with capture or nullcontext():
            features = self._image_pixels_to_features(self.vision_tower, torch.cat(crops))
        per_crop = features.shape[1]
        # The candidate patches of every image, in the selection's order (image, piece, raster).
        index = torch.cat([layout.patches + start * per_crop for layout, start in zip(layouts, _starts(crops))])
        index = index.to(features.device)
        candidates = features.flatten(0, 1)[index]
        scores = keys = None
        if capture is not None:
            scores = capture.scores().flatten(0, 1)[index]
            keys = capture.keys()
            keys = None if keys is None else keys.flatten(0, 1)[index]
        projected = self.multi_modal_projector(candidates) if "projected" in needs else None
        keep, important, replaced = select_tokens(settings, [layout.item() for layout in layouts], candidates, scores, keys, projected)
        if replaced is not None:
            projected = self.multi_modal_projector(replaced.to(candidates.dtype))
        elif projected is None:
            projected = self.multi_modal_projector(candidates)
        return self._vispruner_pack(layouts, keep, important, projected)

    def _vispruner_pack(
        self, layouts: list[Layout], keep: torch.Tensor, important: torch.Tensor | None, projected: torch.Tensor
    ) -> list[torch.Tensor]:
        out, selections, start = [], [], 0
        for layout in layouts:
            size = int(layout.patches.numel())
            image_keep = keep[start : start + size]
            slots = layout.packed_keep(image_keep)
            rows = projected[start : start + size][slots.clamp(min=0)]
            newline = getattr(self, "image_newline", None)
            if newline is not None:
                rows = torch.where((slots < 0).unsqueeze(-1), newline.to(rows.dtype), rows)
            out.append(rows)
            image_important = None if important is None else important[start : start + size]
            selections.append(self._vispruner_selection(layout, image_keep, image_important))
            start += size
        self.vispruner_last = selections
        return out

    def _vispruner_selection(self, layout: Layout, keep: torch.Tensor, important: torch.Tensor | None) -> ImageSelection:
        return _selection(layout, keep, important)


def _starts(crops: list[torch.Tensor]) -> list[int]:
    starts, total = [], 0
    for image in crops:
        starts.append(total)
        total += image.shape[0]
    return starts


def _selection(layout: Layout, keep: torch.Tensor, important: torch.Tensor | None) -> ImageSelection:
    """The library's :class:`ImageSelection` over whole crops (patches unpadding drops: never kept)."""
    rows, cols = layout.shapes[0]  # the base crop (LLaVA-NeXT) or the only one: never unpadded
    patches = layout.patches.to(keep.device)

    def over_crops(flags: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(layout.crops * rows * cols, dtype=torch.bool, device=flags.device)
        full[patches] = flags
        return full.view(layout.crops, rows * cols).cpu()

    return ImageSelection(over_crops(keep), None if important is None else over_crops(important), (rows, cols))


class _LlavaCrops:
    def _vispruner_crops(self, image_input: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[Layout]]:
        pixels = image_input["pixel_values"]
        images = list(pixels) if isinstance(pixels, (list, tuple)) else list(pixels.unbind(0))
        layout = llava_layout(_side(self.config))
        return [image.unsqueeze(0) for image in images], [layout] * len(images)


class _LlavaNextCrops:
    def _vispruner_crops(self, image_input: Mapping[str, Any]) -> tuple[list[torch.Tensor], list[Layout]]:
        pixels = image_input["pixel_values"]
        config = self.config
        sizes = image_input["image_sizes"].tolist()
        layouts = [
            llava_next_layout(tuple(size), _side(config), config.vision_config.image_size, config.image_grid_pinpoints)
            for size in sizes
        ]
        # Batched pixels may carry padding crops beyond an image's own.
        crops = [image[: layout.crops] for image, layout in zip(pixels, layouts)]
        return crops, layouts


@MULTIMODAL_REGISTRY.register_processor(_llava_processor, info=_llava_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunableLlavaForConditionalGeneration(_LlavaCrops, _Pruning, LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vispruner_init()


@MULTIMODAL_REGISTRY.register_processor(
    PrunableLlavaNextProcessor, info=PrunableLlavaNextInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunableLlavaNextForConditionalGeneration(_LlavaNextCrops, _Pruning, LlavaNextForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._vispruner_init()
