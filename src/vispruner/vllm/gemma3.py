"""vLLM's Gemma 3, registered over the built-in architecture name, pruning images when asked.

Imported by vLLM only (lazily). Without the ``vispruner`` override every method below hands
over to vLLM's own; with it, each image keeps K of its pooled tokens, chosen as the library's
transformers path (:mod:`vispruner.adapters.gemma3`) chooses them:

* Prompt side: the processing info builds each image's replacement (``\\n\\n<boi>``, the image
  tokens, ``<eoi>\\n\\n``; with pan-and-scan, the image and then its crops, each so wrapped)
  with K image tokens per tower input instead of ``mm_tokens_per_image``: text + K per image (and
  crop), the begin and end markers kept, as the library keeps them. The language model numbers the
  prompt 0, 1, 2, ..., the library's default ``positions="compacted"``.
* Bidirectional image attention: vLLM derives the ranges its attention makes bidirectional from
  each image's placeholder (its embedding tokens), so they cover the K kept tokens, the block the
  library's compacted ``token_type_ids`` mark.
* ``embed_multimodal`` runs vLLM's tower with the library's :class:`~vispruner.adapters.gemma3.GemmaTap`
  (the pooled features at the projector's norm, where the method chooses) whose signal, the
  attention each patch receives in the tower's last layer, comes from a hook on vLLM's fused
  ``qkv_proj`` (:class:`~.received.QkvReceivedCapture`); per image the kept rows are returned in order.
"""

from __future__ import annotations

from itertools import groupby
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.gemma3_mm import (
    Gemma3DummyInputsBuilder,
    Gemma3ForConditionalGeneration,
    Gemma3MultiModalProcessor,
    Gemma3ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptUpdateDetails

from ..adapters.gemma3 import FAMILY, GemmaTap
from ..adapters.vision_stage import ImageSelection, Item, Settings, select_tokens
from . import runner
from .layout import llava_layout
from .models import RefuseEmbeddings, refuse_compiled_tower
from .received import QkvReceivedCapture
from .settings import settings_for


def _kept(hf_config: Any, settings: Settings) -> int:
    """Image tokens each crop keeps: of its tokens_per_side x tokens_per_side pooled tokens."""
    return llava_layout(int(hf_config.mm_tokens_per_image**0.5)).kept_count(settings)


class PrunableGemma3Info(Gemma3ProcessingInfo):
    """Each tower input (the image, and its pan-and-scan crops) has K image tokens between its
    begin and end markers."""

    def get_image_repl(self, **kwargs: Any) -> PromptUpdateDetails:
        details = super().get_image_repl(**kwargs)
        config = self.get_hf_config()
        settings = settings_for(config)
        if settings is None:
            return details
        image, kept = config.image_token_index, _kept(config, settings)
        ids: list[int] = []
        for is_image, run in groupby(details.full, key=lambda token: token == image):
            run = list(run)
            if is_image and len(run) != config.mm_tokens_per_image:
                raise RuntimeError(
                    f"vispruner expected runs of {config.mm_tokens_per_image} image tokens in vLLM's Gemma 3 image "
                    f"prompt; got one of {len(run)}"
                )
            # The first K of each run: one image token is as good as another, the rows
            # embed_multimodal returns fill them in order.
            ids.extend(run[:kept] if is_image else run)
        return PromptUpdateDetails.select_token_id(ids, image)

    def get_num_image_tokens(self, **kwargs: Any) -> int:
        full = super().get_num_image_tokens(**kwargs)
        config = self.get_hf_config()
        settings = settings_for(config)
        return full if settings is None else full // config.mm_tokens_per_image * _kept(config, settings)


class PrunableGemma3Processor(RefuseEmbeddings, Gemma3MultiModalProcessor):
    pass


class VllmGemmaTap(GemmaTap):
    """The library's :class:`GemmaTap` on vLLM's Gemma 3, with the signal from :class:`QkvReceivedCapture`."""

    def __init__(self, model: nn.Module, attention: nn.Module | None, keep_keys: bool) -> None:
        # The library's tap finds the projector where transformers keeps it, model.model.multi_modal_projector;
        # vLLM's sits on the model itself (same pooling, norm and projection weight).
        super().__init__(SimpleNamespace(model=model), None, keep_keys)
        self._vllm_attention = attention

    def __enter__(self) -> "VllmGemmaTap":
        super().__enter__()
        if self._vllm_attention is not None:
            self._capture = self._stack.enter_context(QkvReceivedCapture(self._vllm_attention, self._keep_keys))
        return self


@MULTIMODAL_REGISTRY.register_processor(
    PrunableGemma3Processor, info=PrunableGemma3Info, dummy_inputs=Gemma3DummyInputsBuilder
)
class PrunableGemma3ForConditionalGeneration(Gemma3ForConditionalGeneration):
    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vispruner_settings = settings_for(self.config)
        #: Per crop of the last pruned ``embed_multimodal`` call, what was kept (as the library's
        #: ``last_selection``: one entry per tower input).
        self.vispruner_last: list[ImageSelection] | None = None
        if self.vispruner_settings is not None:
            refuse_compiled_tower(vllm_config)
            # The layer whose received attention is the signal: the tower's last (its output, normed, is the feature).
            self._vispruner_attention = self.vision_tower.vision_model.encoder.layers[-1].self_attn
            self._vispruner_check_layout()

    def _vispruner_check_layout(self) -> None:
        """``RuntimeError`` unless vLLM's modules have what the hooks and the library's tap read."""
        expected = {
            "the tower's last self_attn": (
                self._vispruner_attention, ("qkv_proj", "num_heads", "num_heads_per_partition", "head_dim", "scale", "tp_size")
            ),
            "multi_modal_projector": (
                self.multi_modal_projector,
                ("avg_pool", "mm_soft_emb_norm", "mm_input_projection_weight", "patches_per_image", "tokens_per_side"),
            ),
        }
        missing = [f"{where}.{name}" for where, (module, names) in expected.items() for name in names if not hasattr(module, name)]
        if missing:
            raise RuntimeError(
                f"vispruner's vLLM plugin reads Gemma 3's tower and projector as laid out in vLLM {runner.TESTED}; this "
                f"vLLM lacks: {', '.join(missing)}"
            )

    def embed_multimodal(self, **kwargs: object) -> Any:
        settings = self.vispruner_settings
        if settings is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        inputs_per_image = image_input["num_patches"].tolist()  # the image, then its pan-and-scan crops
        side = self.multi_modal_projector.tokens_per_side
        # One budget unit per tower input, as the library's GemmaVision.items gives them.
        items = [Item(1, (side, side))] * sum(inputs_per_image)
        needs = settings.method.needs
        attention = self._vispruner_attention if needs & {"attention", "keys"} else None
        tap = VllmGemmaTap(self, attention, "keys" in needs)
        chosen: dict[str, Any] = {}

        def on_features(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            features = tap.features(args)
            projected = tap.project(args) if "projected" in needs else None
            keep, important, replaced = select_tokens(
                settings, items, features, tap.attention(), tap.keys(), projected, FAMILY.shared_piece_budget
            )
            chosen.update(keep=keep, important=important)
            return None if replaced is None else tap.substitute(args, replaced.to(features.dtype))

        handle = tap.module.register_forward_pre_hook(on_features)
        try:
            with tap:
                embeddings = self._process_image_input(image_input)
        finally:
            handle.remove()
        keep, important, size = chosen["keep"], chosen["important"], side * side
        importants = [None] * len(items) if important is None else important.split(size)
        self.vispruner_last = [
            ImageSelection.of_item(flags.cpu(), None if best is None else best.cpu(), item)
            for flags, best, item in zip(keep.split(size), importants, items)
        ]
        out, start = [], 0
        for rows in embeddings:
            out.append(rows[keep[start : start + rows.shape[0]].to(rows.device)])
            start += rows.shape[0]
        return out
