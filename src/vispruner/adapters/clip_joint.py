"""CLIP's joint space for CDPruner's paper-exact relevance on LLaVA (``apply(..., clip=...)``).

The authors (github.com/Theia-4869/CDPruner at 9541616, ``CLIPVisionTower.forward`` and
``load_text_tower`` in ``llava/model/multimodal_encoder/clip_encoder.py``) score each patch by
CLIP's own image-text similarity:

* image side: the patch features of the layer that feeds the projector ([CLS] dropped), through
  the **LLaVA tower's** ``post_layernorm`` (``vision_tower.vision_model.post_layernorm``) (in the tower's dtype), then ``.float()`` and CLIP's
  ``visual_projection`` (float32: they load it from ``CLIPVisionModelWithProjection`` without a
  dtype);
* text side: the question string tokenised by ``CLIPTokenizerFast`` without truncation, ids and
  attention mask zero-padded to a multiple of ``max_position_embeddings`` (77) and reshaped into
  (M, 77) segments, each embedded by ``CLIPTextModelWithProjection`` (``text_embeds``: the text
  transformer's pooled output through ``text_projection``), float32.

Stock LLaVA checkpoints ship neither ``visual_projection`` nor the text tower; the user gives
the CLIP model their tower came from. Only its text tower, ``text_projection`` and
``visual_projection`` are used: the patch features and ``post_layernorm`` are the LLaVA model's
own, as in the authors' code (which LLaVA-NeXT's fine-tuned tower changes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: The families whose vision tower is a CLIP tower with a [CLS] token (``Family.name``).
CLIP_FAMILIES = ("LLaVA-1.5", "LLaVA-NeXT")
ALLOWED = (
    "a transformers.CLIPModel (with its tokenizer loadable from its name_or_path), a (CLIPModel, tokenizer) "
    "pair, or a CLIP checkpoint id or local path"
)


class ClipJoint:
    """A CLIP model and its tokenizer, loaded once: the joint space of :func:`image_embeds` and
    :func:`text_embeds`."""

    def __init__(self, model: nn.Module, tokenizer: Any, owned: bool) -> None:
        self.model = model
        self.tokenizer = tokenizer
        #: Whether vispruner loaded the model (and may move it to the LLaVA model's device).
        self.owned = owned

    def __str__(self) -> str:
        """Where the CLIP came from, as reports (``vispruner eval --json``) show the option."""
        return getattr(self.model, "name_or_path", "") or type(self.model).__name__

    def __repr__(self) -> str:
        return f"ClipJoint({self})"

    def __deepcopy__(self, memo: dict) -> "ClipJoint":
        # Loaded once and read only: copies of the settings holding it (dataclasses.asdict in
        # the bench report) share it rather than copy its weights.
        return self

    def check(self, model: nn.Module, family_name: str) -> None:
        """``ValueError`` naming ``clip`` unless ``model`` (a patched VLM of ``family_name``) has a
        CLIP vision tower of this CLIP's vision dimensions; moves a CLIP vispruner loaded to it."""
        from transformers import CLIPVisionModel

        check_family(family_name)
        tower = model.model.vision_tower
        if not isinstance(tower, CLIPVisionModel):
            raise ValueError(
                f"clip needs the model's vision tower to be a CLIPVisionModel; this {family_name} model has "
                f"{type(tower).__name__}; leave clip unset"
            )
        ours, theirs = model.config.vision_config, self.model.config.vision_config
        fields = ("hidden_size", "image_size", "patch_size")
        if any(getattr(ours, name) != getattr(theirs, name) for name in fields):
            shown = [", ".join(f"{name}={getattr(config, name)}" for name in fields) for config in (ours, theirs)]
            raise ValueError(
                f"clip must be the CLIP model of the LLaVA vision tower (the same {', '.join(fields)}); the model's "
                f"tower has {shown[0]}, the CLIP given has {shown[1]}"
            )
        if self.owned:
            self.model.to(next(tower.parameters()).device)

    def image_embeds(self, tower: nn.Module, patches: torch.Tensor) -> torch.Tensor:
        """(T, C) patch features of the projector's input -> (T, E) float32 joint-space embeddings."""
        weight = self.model.visual_projection.weight  # CLIP's visual projection has no bias
        normed = post_layernorm(tower)(patches).float()
        return nn.functional.linear(normed.to(weight.device), weight.float()).to(patches.device)

    def text_embeds(self, texts: Sequence[str], device: torch.device) -> list[torch.Tensor]:
        """Per text, (M, E) float32 embeddings of its 77-token segments."""
        length = self.model.config.text_config.max_position_embeddings
        weight = self.model.text_projection.weight
        result = []
        for text in texts:
            encoded = self.tokenizer(text=text, return_tensors="pt")
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            segments = (ids.shape[1] - 1) // length + 1
            padding = length * segments - ids.shape[1]
            ids, mask = (torch.cat([v, v.new_zeros((1, padding))], dim=1).reshape(-1, length).to(weight.device) for v in (ids, mask))
            with torch.no_grad():
                pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
                result.append(self.model.text_projection(pooled).float().to(device))
        return result


def post_layernorm(tower: nn.Module) -> nn.Module:
    """A ``CLIPVisionModel``'s final layer norm (on the tower in transformers 5.x, on its
    ``vision_model`` in 4.x, where the authors' code reads it)."""
    norm = getattr(tower, "post_layernorm", None)
    return norm if norm is not None else tower.vision_model.post_layernorm


def check_family(family_name: str) -> None:
    """``ValueError`` naming ``clip`` unless the family ``family_name`` has a CLIP vision tower."""
    if family_name not in CLIP_FAMILIES:
        raise ValueError(
            f"clip is for the families with a CLIP vision tower ({', '.join(CLIP_FAMILIES)}); got a {family_name} "
            "model; leave clip unset (cdpruner then uses the variant of docs/methods.md)"
        )


def load_clip(value: object, name: str = "clip") -> ClipJoint:
    """``value`` (see :data:`ALLOWED`) as a :class:`ClipJoint`; a checkpoint is loaded here, once,
    in float32 as the authors load it. ``ValueError`` naming ``name`` otherwise."""
    from transformers import CLIPModel, CLIPTokenizerFast

    if isinstance(value, ClipJoint):
        return value
    if isinstance(value, (str, os.PathLike)):
        from transformers.utils import logging

        # Checking an option prints nothing (the commands' errors are one line); restored after.
        shown = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            model = CLIPModel.from_pretrained(value, dtype=torch.float32)
            tokenizer = CLIPTokenizerFast.from_pretrained(value)
        except (OSError, ValueError) as error:
            raise ValueError(f"{name}: could not load a CLIP model and tokenizer from {str(value)!r} ({error})") from error
        finally:
            if shown:
                logging.enable_progress_bar()
        return ClipJoint(model.eval(), tokenizer, owned=True)
    tokenizer = None
    if isinstance(value, tuple) and len(value) == 2:
        value, tokenizer = value
    if not isinstance(value, CLIPModel):
        raise ValueError(f"{name} must be {ALLOWED}; got {type(value).__name__}")
    if tokenizer is None:
        path = getattr(value, "name_or_path", "")
        try:
            tokenizer = CLIPTokenizerFast.from_pretrained(path) if path else None
        except (OSError, ValueError):
            tokenizer = None
        if tokenizer is None:
            raise ValueError(
                f"{name}: no CLIP tokenizer could be loaded for this CLIPModel (name_or_path {path!r}); "
                f"pass {name}=(model, tokenizer)"
            )
    if not callable(tokenizer):
        raise ValueError(f"{name}: the tokenizer of a (CLIPModel, tokenizer) pair must be callable; got {type(tokenizer).__name__}")
    return ClipJoint(value, tokenizer, owned=False)
