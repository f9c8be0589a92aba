"""The vision side of LLaVA-style models: a CLIP tower with [CLS], a projector after a feature layer.

The importance signal is the [CLS] attention row of the layer whose output feeds the projector
(and, when asked, that layer's keys); the features are the projector's input, one row per patch
of each crop. A family built on it says only how many crops an image has and how the crops'
keep flags are laid out in the prompt.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable

import torch
from torch import nn

from .cls_attention import ClsAttentionCapture
from .vision_stage import Item, Modality

#: ``(model, pixel_values, image_sizes) -> [crops of each image]``.
CropCounter = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None"], "list[int]"]
#: ``(model, [(crops, N) bool per image], image_sizes) -> [(P,) bool per image]``.
Packer = Callable[[nn.Module, "list[torch.Tensor]", "torch.Tensor | None"], "list[torch.Tensor]"]

IMAGE = Modality(
    name="image",
    encoder="get_image_features",
    pixels="pixel_values",
    token_id="image_token_id",
    arguments=("image_sizes", "vision_feature_layer", "vision_feature_select_strategy"),
)


class ProjectorVision:
    """:class:`~.vision_stage.VisionSide` of one LLaVA-style model (crops of a CLIP grid)."""

    def __init__(self, model: nn.Module, crops_per_image: CropCounter, pack: Packer) -> None:
        self.model = model
        self._crops_per_image = crops_per_image
        self._pack = pack
        self.layers = encoder_layers(model.model.vision_tower)
        _check_model(model, self.layers)
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        crops = self._crops_per_image(self.model, arguments["pixel_values"], arguments.get("image_sizes"))
        return [Item(count, self.grid) for count in crops]

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        return self._pack(self.model, keeps, arguments.get("image_sizes"))

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> "ProjectorTap":
        attention = feature_attention(self.model, self.layers, arguments, "default")
        attention = attention if needs & {"attention", "keys"} else None
        return ProjectorTap(self.model.model.multi_modal_projector, attention, keep_keys="keys" in needs)


def feature_attention(
    model: nn.Module,
    layers: nn.ModuleList,
    arguments: dict[str, Any],
    strategy: str | None,
    attribute: str = "self_attn",
) -> nn.Module:
    """The self-attention of the vision layer whose output feeds the projector in a feature call.

    ``arguments`` are the call's (``vision_feature_layer`` and ``vision_feature_select_strategy``,
    the config's when not given); ``ValueError`` unless the layer is one int and the strategy is
    ``strategy`` ("default": [CLS] dropped; "full": towers without [CLS]; None: the model has no
    such setting, Mistral 3). ``attribute``: the layer's self-attention module (InternViT and
    Pixtral call it ``attention``).
    """
    config = model.config
    layer = arguments.get("vision_feature_layer")
    layer = config.vision_feature_layer if layer is None else layer
    if strategy is None:
        if not isinstance(layer, int):
            raise ValueError(f"pruning needs one vision_feature_layer (an int); got {layer!r}")
    else:
        chosen = arguments.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if not isinstance(layer, int) or chosen != strategy:
            raise ValueError(
                f"pruning needs one vision_feature_layer (an int) and vision_feature_select_strategy={strategy!r}; "
                f"got {layer!r} and {chosen!r}"
            )
    # hidden_states[h] is the output of encoder layer h - 1 (hidden_states[0] is its input).
    count = len(layers)
    hidden = layer if layer >= 0 else count + 1 + layer
    if not 1 <= hidden <= count:
        raise ValueError(
            f"vision_feature_layer must select an encoder layer's output: an integer in -{count}..-1 or 1..{count}; "
            f"got {layer}"
        )
    return getattr(layers[hidden - 1], attribute)


class ProjectorTap:
    """[CLS] attention (and keys) of one CLIP layer; the projector's (crops, N, C) input as features."""

    def __init__(
        self,
        projector: nn.Module,
        attention: nn.Module | None,
        keep_keys: bool,
        projections: tuple[str, str] = ("q_proj", "k_proj"),
    ) -> None:
        self.module = projector
        self._attention = attention
        self._keep_keys = keep_keys
        self._projections = projections
        self._capture: ClsAttentionCapture | None = None
        self._stack = ExitStack()

    def __enter__(self) -> "ProjectorTap":
        if self._attention is not None:
            self._capture = self._stack.enter_context(ClsAttentionCapture(self._attention, self._keep_keys, self._projections))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def features(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return inputs[0].flatten(0, 1)

    def attention(self) -> torch.Tensor | None:
        return None if self._capture is None else self._capture.scores().flatten(0, 1)

    def keys(self) -> torch.Tensor | None:
        keys = None if self._capture is None else self._capture.keys()
        return None if keys is None else keys.flatten(0, 1)

    def project(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # forward, not __call__: the pre-hook must not fire again for its own projection.
        return self.module.forward(inputs[0]).flatten(0, 1)

    def substitute(self, inputs: tuple[torch.Tensor, ...], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (features.view_as(inputs[0]), *inputs[1:])


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    for owner in (tower, getattr(tower, "vision_model", None)):
        layers = getattr(getattr(owner, "encoder", None), "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"vision tower {type(tower).__name__} has no encoder.layers; vispruner supports CLIP-style towers")


def _check_model(model: nn.Module, layers: nn.ModuleList) -> None:
    config = model.config
    attention = getattr(layers[0], "self_attn", None)
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "num_heads", "head_dim", "scale")):
        raise TypeError(
            f"vision tower {type(model.model.vision_tower).__name__} is not a CLIP-style transformer with a [CLS] "
            "token; vispruner supports CLIP towers"
        )
    if not isinstance(config.vision_feature_layer, int) or config.vision_feature_select_strategy != "default":
        raise TypeError(
            "vispruner needs a model whose features come from one vision layer with [CLS] dropped "
            "(config.vision_feature_layer an int, vision_feature_select_strategy='default'); got "
            f"{config.vision_feature_layer!r} and {config.vision_feature_select_strategy!r}"
        )
