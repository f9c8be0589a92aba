"""Vision-stage pruning for LLaVA-style models: choose patches per image, shorten the prompt to match.

Where transformers 5.x lets us in (see docs/models.md for the user's view):

* ``model.model.get_image_features`` is wrapped. ``generate()`` calls it before the prefill, and
  the model's forward calls it when given ``pixel_values``. Inside it, hooks on the vision layer
  that feeds the projector capture the [CLS] attention row (and keys), and a pre-hook on the
  projector runs the method on the projector's input and substitutes the method's replacement
  features. The returned per-image features keep their full length, because ``generate()``
  matches them to placeholder counts when it expands a batch for beams or several sequences;
  each feature tensor carries its keep mask as an attribute, which those copies by reference keep.
* ``model.forward`` is wrapped. At the prefill it turns the per-image masks into a token keep mask
  (all text, kept placeholders), compacts ids, embeddings, mask, positions and labels, and passes
  only the kept features on. The cache it returns carries a :class:`CompactedPrefix`, with which
  every later step translates the caller's full-length mask and positions.
* ``create_masks_for_generate`` returns the 2D mask unchanged at the prefill and at steps that
  follow a pruned prefill (static caches), so that the language model builds its causal mask
  from the compacted 2D mask.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..methods.base import Method, VisionSignals
from .cls_attention import ClsAttentionCapture
from .patching import InstancePatch, bind_arguments
from .sequence import CompactedPrefix, compact

#: Attribute of a patched model holding its :class:`VisionStagePruner`.
PRUNER = "_vispruner"
#: Attribute of an image's feature tensor: (P,) bool over its placeholder tokens.
KEEP = "_vispruner_keep"
#: Attribute of a KV cache filled by a pruned prefill: its :class:`CompactedPrefix`.
PREFIX = "_vispruner_prefix"

BUDGETS = ("per_crop", "per_image")

#: generate() settings that re-run or slice the prompt in ways a pruned cache cannot follow.
UNSUPPORTED_GENERATE = {
    "assistant_model": "assisted generation",
    "prompt_lookup_num_tokens": "prompt lookup decoding",
    "assistant_early_exit": "self-speculative (early-exit) decoding",
    "use_mtp": "multi-token-prediction decoding",
    "prefill_chunk_size": "chunked prefill",
}


@dataclass(frozen=True)
class Family:
    """What differs between LLaVA-style model families.

    Attributes:
        name: the family as users know it.
        model_class: the supported ``...ForConditionalGeneration`` class.
        example: a public checkpoint id, for docs and error messages.
        crops_per_image: ``(model, pixel_values, image_sizes) -> [crops of each image]``; the
            vision tower sees the crops of all images concatenated, base image first.
        pack: ``(model, [(crops, N) bool per image], image_sizes) -> [(P,) bool per image]``: the
            crop keep masks in the order of the image's P placeholder tokens.
    """

    name: str
    model_class: type
    example: str
    crops_per_image: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], list[int]]
    pack: Callable[[nn.Module, list[torch.Tensor], torch.Tensor | None], list[torch.Tensor]]


@dataclass
class ImageSelection:
    """What was kept of one image at the last pruned forward.

    Attributes:
        keep: (crops, N) bool over each crop's patch grid in raster order; one crop for
            LLaVA-1.5, base image first then the high-resolution crops for LLaVA-NeXT.
        important: (crops, N) bool subset of ``keep`` chosen by importance ([CLS] attention for
            VisPruner); the rest of ``keep`` was chosen for diversity. None when the method
            makes no such split.
        grid: (rows, cols) of each crop's patch grid.
    """

    keep: torch.Tensor
    important: torch.Tensor | None
    grid: tuple[int, int]

    @property
    def indices(self) -> list[torch.Tensor]:
        """Kept patch indices of each crop, ascending."""
        return [row.nonzero().flatten() for row in self.keep]

    @property
    def important_indices(self) -> list[torch.Tensor] | None:
        return None if self.important is None else [row.nonzero().flatten() for row in self.important]

    @property
    def diverse_indices(self) -> list[torch.Tensor] | None:
        if self.important is None:
            return None
        return [row.nonzero().flatten() for row in self.keep & ~self.important]


@dataclass(frozen=True)
class Settings:
    """A validated pruning configuration (see :func:`vispruner.apply`)."""

    method: Method
    num_tokens: int
    options: dict[str, Any] = field(default_factory=dict)
    budget: str = "per_crop"


class VisionStagePruner:
    """Pruning installed on one model instance; :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module, family: Family, settings: Settings) -> None:
        self.model = model
        self.family = family
        self.settings = settings
        self.last: list[ImageSelection] | None = None
        #: (B, L) bool: the tokens of the last pruned prefill that reached the language model.
        self.last_tokens: torch.Tensor | None = None
        self._layers = _encoder_layers(model.model.vision_tower)
        _check_model(model, self._layers)
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self._patch = InstancePatch()

    def install(self) -> None:
        from transformers.generation.utils import create_masks_for_generate

        self._patch.wrap(self.model.model, "get_image_features", self._get_image_features)
        self._patch.wrap(self.model, "forward", self._forward)
        self._patch.wrap(self.model, "generate", self._generate)
        stock = getattr(self.model, "create_masks_for_generate", create_masks_for_generate)
        self._patch.wrap(self.model, "create_masks_for_generate", self._masks_for_generate, original=stock)
        setattr(self.model, PRUNER, self)

    def remove(self) -> None:
        self._patch.restore()
        delattr(self.model, PRUNER)

    # -- vision side -----------------------------------------------------------------------

    def _get_image_features(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        config = self.model.config
        layer = arguments.get("vision_feature_layer")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = arguments.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
        if not isinstance(layer, int) or strategy != "default":
            raise ValueError(
                "pruning needs one vision_feature_layer (an int) and vision_feature_select_strategy='default'; "
                f"got {layer!r} and {strategy!r}"
            )
        image_sizes = arguments.get("image_sizes")
        crops = self.family.crops_per_image(self.model, arguments["pixel_values"], image_sizes)
        needs = self.settings.method.needs
        chosen: dict[str, Any] = {}

        with ExitStack() as stack:
            capture = None
            if needs & {"attention", "keys"}:
                attention = self._attention_module(layer)
                capture = stack.enter_context(ClsAttentionCapture(attention, keep_keys="keys" in needs))

            def on_projector(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
                features = inputs[0]
                scores = capture.scores() if capture is not None else None
                keys = capture.keys() if capture is not None else None
                # forward, not __call__: this hook must not fire again for its own projection.
                projected = module.forward(features) if "projected" in needs else None
                keep, important, replaced = self._select(features, scores, keys, projected, crops)
                chosen.update(keep=keep, important=important)
                return None if replaced is None else (replaced.to(features.dtype), *inputs[1:])

            handle = self.model.model.multi_modal_projector.register_forward_pre_hook(on_projector)
            stack.callback(handle.remove)
            output = original(*args, **kwargs)

        if "keep" not in chosen:
            raise RuntimeError("the multimodal projector did not run inside get_image_features")
        keeps = list(chosen["keep"].split(crops))
        importants = chosen["important"].split(crops) if chosen["important"] is not None else [None] * len(crops)
        self.last = [ImageSelection(k, i, self.grid) for k, i in zip(keeps, importants)]
        features = output.pooler_output if hasattr(output, "pooler_output") else output[1]
        for image, mask in zip(features, self.family.pack(self.model, keeps, image_sizes)):
            if image.shape[0] != mask.shape[0]:
                raise RuntimeError(f"an image has {image.shape[0]} feature rows but {mask.shape[0]} packed keep flags")
            setattr(image, KEEP, mask.to(image.device))
        return output

    def _attention_module(self, feature_layer: int) -> nn.Module:
        # hidden_states[h] is the output of encoder layer h - 1 (hidden_states[0] is its input).
        count = len(self._layers)
        hidden = feature_layer if feature_layer >= 0 else count + 1 + feature_layer
        if not 1 <= hidden <= count:
            raise ValueError(
                f"vision_feature_layer must select an encoder layer's output: an integer in "
                f"-{count}..-1 or 1..{count}; got {feature_layer}"
            )
        return self._layers[hidden - 1].self_attn

    def _select(
        self,
        features: torch.Tensor,
        scores: torch.Tensor | None,
        keys: torch.Tensor | None,
        projected: torch.Tensor | None,
        crops: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Run the method on (total crops, N, C) features; return crop-level keep, important, features.

        Per crop, all crops are one batch. Per image, an image's crops are one sequence of
        crops x N tokens (its patch grids stacked vertically), so the method spends the budget
        where the image needs it; images with equal crop counts share a batch.
        """
        settings = self.settings
        total, tokens, _ = features.shape
        if settings.budget == "per_crop":
            groups = {1: [[index] for index in range(total)]}
        else:
            groups = defaultdict(list)
            start = 0
            for count in crops:
                groups[count].append(list(range(start, start + count)))
                start += count
        keep = torch.zeros(total, tokens, dtype=torch.bool, device=features.device)
        important = None
        replaced = None
        for count, members in groups.items():
            index = torch.tensor([i for member in members for i in member], device=features.device)
            units = len(members)

            def gather(values: torch.Tensor | None) -> torch.Tensor | None:
                return None if values is None else values[index].reshape(units, count * tokens, *values.shape[2:])

            signals = VisionSignals(
                features=gather(features),
                attention=gather(scores),
                keys=gather(keys),
                grid=(count * self.grid[0], self.grid[1]),
                projected=gather(projected),
            )
            with torch.no_grad():
                selection = settings.method.select(signals, settings.num_tokens, **settings.options)
            keep[index] = selection.keep.reshape(units * count, tokens)
            if selection.important is not None:
                if important is None:
                    important = torch.zeros_like(keep)
                important[index] = selection.important.reshape(units * count, tokens)
            if selection.features is not None:
                if replaced is None:
                    replaced = features.clone()
                replaced[index] = selection.features.reshape(units * count, tokens, -1).to(features.dtype)
        return keep, important, replaced

    # -- language side ---------------------------------------------------------------------

    def _generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        if arguments.get("pixel_values") is not None or arguments.get("mm_encoder_outputs") is not None:
            config = arguments.get("generation_config") or self.model.generation_config
            for name, feature in UNSUPPORTED_GENERATE.items():
                value = arguments[name] if name in arguments else getattr(config, name, None)
                if value is not None and value is not False:
                    shown = repr(value) if isinstance(value, (int, float, str)) else type(value).__name__
                    raise NotImplementedError(
                        f"{feature} ({name}={shown}) is not supported on a pruned model with images; "
                        "leave it unset, or vispruner.remove(model) first"
                    )
        return original(*args, **kwargs)

    def _forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        cache = arguments.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0 and hasattr(cache, PREFIX):
            delattr(cache, PREFIX)  # a reset cache: static caches are reused across generate() calls
        encoded = dict(arguments.get("mm_encoder_outputs") or {})
        pixel_values = arguments.get("pixel_values")
        if encoded.get("image") is None and pixel_values is not None and pixel_values.shape[0] > 0:
            encoded["image"] = self.model.model.get_image_features(
                pixel_values=pixel_values,
                image_sizes=arguments.get("image_sizes"),
                vision_feature_layer=arguments.get("vision_feature_layer"),
                vision_feature_select_strategy=arguments.get("vision_feature_select_strategy"),
                return_dict=True,
            )
            arguments["pixel_values"] = None
            arguments["mm_encoder_outputs"] = encoded
        if encoded.get("image") is None:
            return original(**self._after_prefill(arguments, cache, past))
        if past:
            raise NotImplementedError(
                "vispruner prunes images in the first forward of a KV cache; images in a later chunk "
                "(prefill_chunk_size, or continuing a cache with a new image) are not supported"
            )
        return self._prefill(original, arguments, encoded)

    def _after_prefill(self, arguments: dict[str, Any], cache: Any, past: int) -> dict[str, Any]:
        prefix: CompactedPrefix | None = getattr(cache, PREFIX, None)
        if prefix is None:
            return arguments
        inputs = arguments.get("input_ids")
        if inputs is None:
            inputs = arguments["inputs_embeds"]
        arguments["attention_mask"] = prefix.mask(arguments.get("attention_mask"), past, inputs.shape[1])
        arguments["position_ids"] = prefix.positions(arguments.get("position_ids"), past, inputs.shape[1])
        return arguments

    def _prefill(self, original: Callable[..., Any], arguments: dict[str, Any], encoded: dict[str, Any]) -> Any:
        images = encoded["image"]
        features = list(images.pooler_output)
        masks = [getattr(image, KEEP, None) for image in features]
        if any(mask is None for mask in masks):
            raise ValueError(
                "mm_encoder_outputs['image'] was computed without vispruner (or copied, which drops the "
                "keep masks); pass pixel_values, or compute it with the patched model.model.get_image_features"
            )
        input_ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        is_image = self._placeholders(input_ids, embeds)
        image_keep = torch.cat(masks).to(is_image.device)
        if int(is_image.sum()) != image_keep.numel() or bool(image_keep.all()):
            # Nothing to prune, or a placeholder mismatch the stock forward reports in its own words.
            self.last_tokens = torch.ones_like(is_image)
            return original(**arguments)
        if isinstance(arguments.get("logits_to_keep"), torch.Tensor):
            raise NotImplementedError("logits_to_keep as a tensor of positions is not supported with pruning; pass an int")

        keep = ~is_image
        keep[is_image] = image_keep
        short = compact(
            keep,
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=arguments.get("attention_mask"),
            position_ids=arguments.get("position_ids"),
            labels=arguments.get("labels"),
            pad_token_id=self._pad_token_id(),
        )
        kept = type(images)(**images)
        kept.pooler_output = [image[mask.to(image.device)] for image, mask in zip(features, masks)]
        arguments.update(
            input_ids=short.input_ids,
            inputs_embeds=short.inputs_embeds,
            attention_mask=short.attention_mask,
            position_ids=short.position_ids,
            labels=short.labels,
            mm_encoder_outputs={**encoded, "image": kept},
        )
        output = original(**arguments)
        cache = _cache_of(output)
        if cache is not None:
            setattr(cache, PREFIX, short.prefix)
        self.last_tokens = keep
        return output

    def _placeholders(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        image_token_id = self.model.config.image_token_id
        if input_ids is not None:
            return input_ids == image_token_id
        token = torch.tensor(image_token_id, device=embeds.device)
        return (embeds == self.model.get_input_embeddings()(token)).all(dim=-1)

    def _pad_token_id(self) -> int:
        # Any id but the image token works: padding is masked, and it must not count as a placeholder.
        config = self.model.config
        candidates = (getattr(config.text_config, "pad_token_id", None), getattr(config, "pad_token_id", None), 0, 1)
        return next(c for c in candidates if c is not None and c != config.image_token_id)

    def _masks_for_generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        if arguments.get("is_first_iteration") or hasattr(arguments.get("past_key_values"), PREFIX):
            return arguments.get("attention_mask")
        return original(*args, **kwargs)


def _cache_of(output: Any) -> Any:
    from transformers.cache_utils import Cache

    if hasattr(output, "past_key_values"):
        return output.past_key_values
    return next((item for item in output if isinstance(item, Cache)), None)


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
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
