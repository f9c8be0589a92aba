"""Vision-stage pruning: choose visual tokens per image (or video), shorten the prompt to match.

A model family states what differs (see :class:`Family` and :class:`VisionSide`): where the
importance signal and the features come from, how an image's tokens are split into pieces that
get their own budget, in which order its tokens stand in the prompt, how positions are built,
and which other per-token streams follow the tokens. Everything else is here. Where
transformers 5.x lets us in (see docs/models.md for the user's view):

* Each modality's feature function (``model.model.get_image_features``, ``get_video_features``)
  is wrapped. ``generate()`` calls it before the prefill, and the model's forward calls it when
  given pixels. Inside it, the family's :class:`Tap` hooks the vision tower; a pre-hook on the
  module that turns the chosen features into language-model tokens (LLaVA's projector, Qwen's
  merger) runs the method and substitutes the method's replacement features. The returned
  per-image features keep their full length, because ``generate()`` matches them to placeholder
  counts when it expands a batch for beams or several sequences; each feature tensor carries its
  keep mask as an attribute, which those copies by reference keep.
* ``model.forward`` is wrapped. At the prefill it turns the per-image masks into a token keep mask
  (all text, kept placeholders), compacts ids, embeddings, mask, positions, labels and the
  family's other streams (padding dropped; positions renumbered, or the original ones with
  ``positions="original"``), and passes only the kept features on. The cache it returns carries a
  :class:`CompactedPrefix`, with which every later step translates the caller's full-length mask
  and positions.
* ``create_masks_for_generate`` returns the 2D mask unchanged at the prefill and at steps that
  follow a pruned prefill (static caches), so that the language model builds its causal mask
  from the compacted 2D mask.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from ..methods.base import Method, VisionSignals
from . import hf_seam
from .budget import ratio_tokens, shared_tokens
from .clip_joint import ClipJoint
from .instruction import instruction_embeddings, items_per_row
from .patching import InstancePatch, Outermost, bind_arguments
from .sequence import CompactedPrefix, compact

#: Attribute of a patched model holding its :class:`VisionStagePruner`.
PRUNER = "_vispruner"
#: Attribute of an image's feature tensor: (P,) bool over its placeholder tokens.
KEEP = "_vispruner_keep"
#: Attribute of an image's feature tensor: its :class:`ImageSelection`.
SELECTION = "_vispruner_selection"
#: Attribute of a feature output whose stock ``pooler_output`` was one (items, P, D) tensor.
STACKED = "_vispruner_stacked"
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
class Modality:
    """One kind of visual input and where the model turns it into tokens.

    Attributes:
        name: its key in ``mm_encoder_outputs`` (``"image"``, ``"video"``).
        encoder: the method of ``model.model`` that computes its features.
        pixels: the ``forward`` argument holding its pixels.
        token_id: the config attribute holding its placeholder token id.
        arguments: further ``forward`` arguments the encoder takes, by the same name.
        token_type: when modalities share a placeholder id (GLM-4.1V's video frames use the
            image token), the ``mm_token_type_ids`` value that marks this one's placeholders.

    Where the stock encoder returns ``pooler_output`` as one (items, P, D) tensor (Gemma 3 images,
    LLaVA-OneVision videos, InternVL; SmolVLM up to transformers 5.20) rather than a list of
    per-item tensors, the patched encoder returns a list (each item carries its keep mask) and
    marks the output (:data:`STACKED`), and the forward gets a tensor again.
    """

    name: str
    encoder: str
    pixels: str
    token_id: str
    arguments: tuple[str, ...] = ()
    token_type: int | None = None

    def placeholders(self, config: Any, input_ids: torch.Tensor, token_types: torch.Tensor | None) -> torch.Tensor:
        """(B, L) bool: this modality's placeholder tokens in ``input_ids``."""
        found = input_ids == getattr(config, self.token_id)
        if self.token_type is None:
            return found
        if token_types is None:
            raise ValueError(
                f"this model marks image and video placeholders with one token id; pruning tells its {self.name} "
                "placeholders by mm_token_type_ids (as the processor returns them), which were not given"
            )
        return found & (token_types.to(found.device) == self.token_type)


@dataclass(frozen=True)
class Item:
    """One image (or video) as the selection sees it: ``pieces`` grids of ``grid`` tokens.

    Its tokens are listed piece by piece, each piece in raster order of its grid. A piece is a
    LLaVA-NeXT crop (base image first), a Qwen-VL temporal group of frames, a video frame.
    ``shapes``, when given, replaces ``pieces`` x ``grid`` by pieces of their own grids, and
    ``crops`` says how many crops each stands for in a per-crop budget (LLaVA-OneVision: the
    base crop, then the high-resolution grid as packed, unpadded and downsampled).
    """

    pieces: int
    grid: tuple[int, int]
    shapes: tuple[tuple[int, int], ...] | None = None
    crops: tuple[int, ...] | None = None

    @property
    def per_piece(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """The grid of each piece."""
        return self.shapes if self.shapes is not None else (self.grid,) * self.pieces

    @property
    def size(self) -> int:
        """Tokens of all pieces."""
        return sum(rows * cols for rows, cols in self.grids)

    @property
    def uniform(self) -> bool:
        return len(set(self.grids)) <= 1


class Tap(Protocol):
    """A family's hooks on the vision tower for one feature call, active as a context manager.

    ``module``'s forward pre-hook receives the features to choose among (the projector's or the
    merger's input). All tensors are in the selection's token order: items in order, each item
    piece by piece (see :class:`Item`).
    """

    module: nn.Module

    def __enter__(self) -> "Tap": ...

    def __exit__(self, *exc_info: object) -> None: ...

    def features(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(T, C) the features of every token, from ``module``'s inputs."""

    def attention(self) -> torch.Tensor | None:
        """(T,) the importance signal, once the tower ran (None if not asked for)."""

    def keys(self) -> torch.Tensor | None:
        """(T, H, d) or (T, D) attention keys (None if not asked for)."""

    def project(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(T, D) what ``module`` makes of its inputs: the language model's tokens."""

    def substitute(self, inputs: tuple[torch.Tensor, ...], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``module``'s inputs with (T, C) ``features`` in place of its own."""


class VisionSide(Protocol):
    """What a family's vision tower looks like to the selection, for one model instance."""

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        """The items of one feature call (``arguments``: the feature function's, by name)."""

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> Tap:
        """Hooks that capture what a method ``needs`` during the feature call."""

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        """Per item, (pieces, N) keep flags -> (P,) flags in the order of its P placeholder tokens."""


class Positions(Protocol):
    """How a family's language model gets positions for a pruned prompt."""

    def prefill(self, model: nn.Module, arguments: dict[str, Any]) -> torch.Tensor | None:
        """(R, B, L) positions of the unpruned prompt whose rows 1.. are kept as they are (row 0
        is compacted), or None to compact 2D positions as :func:`compact` does."""

    def step(
        self, model: nn.Module, arguments: dict[str, Any], prefix: CompactedPrefix, past: int, new: int
    ) -> torch.Tensor | None:
        """Positions for a step after a pruned prefill (``arguments`` still hold the caller's)."""


class CompactedPositions:
    """1D positions as :func:`compact` builds them: renumbered (the language model sees the short
    prompt as if it were the prompt) or, with ``positions="original"``, the unpruned ones."""

    def prefill(self, model: nn.Module, arguments: dict[str, Any]) -> torch.Tensor | None:
        return None

    def step(
        self, model: nn.Module, arguments: dict[str, Any], prefix: CompactedPrefix, past: int, new: int
    ) -> torch.Tensor | None:
        return prefix.positions(arguments.get("position_ids"), past, new)


@dataclass(frozen=True)
class Family:
    """What differs between model families.

    Attributes:
        name: the family as users know it.
        model_class: the supported ``...ForConditionalGeneration`` class (or classes).
        example: a public checkpoint id, for docs and error messages.
        vision: ``model -> VisionSide``; raises ``TypeError`` for a model it cannot serve.
        modalities: the visual inputs the family prunes.
        positions: how positions are built for the short prompt.
        streams: further (B, L) ``forward`` arguments compacted with the tokens (new padding 0).
        passthrough: further ``forward`` arguments the wrappers pass on as they are (Gemma 4's
            audio features: the tokens they fill are kept, as text is).
        item_streams: attributes of the feature output that hold, per layer, one tensor per
            item aligned with its tokens (Qwen3-VL's deepstack features); kept rows are taken.
        shared_piece_budget: with ``budget="per_crop"``, whether ``num_tokens`` is shared by an
            item's pieces (Qwen-VL video: each temporal group gets its share) rather than given
            to each piece (LLaVA-NeXT crops, the authors' setting).
        original_positions_only: whether ``positions="original"`` is the only setting (3D
            positions gathered from the unpruned prompt have no renumbered counterpart).
        language_stage: why LLM-stage methods (FastV) cannot run on it, or None if they can.
        repeats_wrongly: why the stock ``generate()`` cannot repeat a prompt holding several
            images, or a video, for beam search or ``num_return_sequences`` (GLM-4.1V interleaves
            the images of the copies); such calls are refused. None if it can.
        per_image: why ``budget="per_image"`` cannot run on it, or None if it can (InternVL and
            SmolVLM get their tiles as a flat batch that does not say which image each is of).
    """

    name: str
    model_class: type | tuple[type, ...]
    example: str
    vision: Callable[[nn.Module], VisionSide]
    modalities: tuple[Modality, ...]
    positions: Positions = field(default_factory=CompactedPositions)
    streams: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()
    item_streams: tuple[str, ...] = ()
    shared_piece_budget: bool = False
    original_positions_only: bool = False
    language_stage: str | None = None
    repeats_wrongly: str | None = None
    per_image: str | None = None

    @property
    def arguments(self) -> frozenset[str]:
        """The family's own ``forward`` arguments (pixels, grids, streams, passed-through ones), which the generation
        protocol's drift check (:func:`.hf_seam.check_known`) accepts besides the common ones."""
        names = {name for modality in self.modalities for name in (modality.pixels, *modality.arguments)}
        return frozenset(names.union(self.streams, self.passthrough))


@dataclass
class ImageSelection:
    """What was kept of one image (or video) at the last pruned forward.

    Attributes:
        keep: (pieces, N) bool over each piece's token grid in raster order; one piece for
            LLaVA-1.5 and Qwen-VL images, base image first then the high-resolution crops for
            LLaVA-NeXT, one per temporal group of frames for Qwen-VL video.
        important: (pieces, N) bool subset of ``keep`` chosen by importance ([CLS] attention for
            VisPruner on LLaVA); the rest of ``keep`` was chosen for diversity. None when the
            method makes no such split.
        grid: (rows, cols) of each piece's grid.
        modality: ``"image"`` or ``"video"``.
    """

    keep: torch.Tensor
    important: torch.Tensor | None
    grid: tuple[int, int]
    modality: str = "image"

    @property
    def indices(self) -> list[torch.Tensor]:
        """Kept token indices of each piece, ascending."""
        return [row.nonzero().flatten() for row in self.keep]

    @property
    def important_indices(self) -> list[torch.Tensor] | None:
        return None if self.important is None else [row.nonzero().flatten() for row in self.important]

    @property
    def diverse_indices(self) -> list[torch.Tensor] | None:
        if self.important is None:
            return None
        return [row.nonzero().flatten() for row in self.keep & ~self.important]

    @classmethod
    def of_item(
        cls, keep: torch.Tensor, important: torch.Tensor | None, item: Item, modality: str = "image"
    ) -> "ImageSelection":
        """One item's selection from its (T,) ``keep`` and ``important`` flags over its candidates:
        one row per piece where the pieces are alike, else one row over all of them."""
        grid = item.grid if item.uniform else (1, item.size)
        return cls(_by_piece(keep, item), None if important is None else _by_piece(important, item), grid, modality)


@dataclass(frozen=True)
class Settings:
    """A validated pruning configuration (see :func:`vispruner.apply`).

    Exactly one of ``num_tokens`` and ``keep_ratio`` is set.
    """

    method: Method
    num_tokens: int | None
    options: dict[str, Any] = field(default_factory=dict)
    budget: str = "per_crop"
    keep_ratio: float | None = None
    #: How the kept tokens are numbered: see :data:`.positions.POSITIONS`.
    positions: str = "compacted"

    def tokens_for(self, size: int) -> int:
        """Tokens kept of a unit of ``size`` tokens under ``keep_ratio`` (or ``num_tokens``)."""
        if self.keep_ratio is None:
            return self.num_tokens
        return ratio_tokens(self.keep_ratio, size)


class VisionStagePruner:
    """Pruning installed on one model instance; :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module, family: Family, settings: Settings) -> None:
        self.model = model
        self.family = family
        self.settings = settings
        self.vision = family.vision(model)
        self.last: list[ImageSelection] | None = None
        #: (B, L) bool: the tokens of the last pruned prefill that reached the language model.
        self.last_tokens: torch.Tensor | None = None
        #: (input_ids, attention_mask) of the generate() or forward() call under way, for methods
        #: that select by the instruction.
        self._prompt: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        #: CDPruner's CLIP joint space (its ``clip`` option), checked against this model, or None.
        self.clip: ClipJoint | None = settings.options.get("clip")
        if self.clip is not None:
            self.clip.check(model, family.name)
        #: Per prompt row, its question, given by :func:`vispruner.instructions` (``clip`` reads it).
        self.texts: list[str] | None = None
        self._patch = InstancePatch()
        self._outermost = Outermost()

    def install(self) -> None:
        for modality in self.family.modalities:
            self._patch.wrap(self.model.model, modality.encoder, self._encoder(modality))
        self._patch.wrap(self.model, "forward", self._forward)
        self._patch.wrap(self.model, "generate", self._generate)
        stock = hf_seam.masks_for_generate(self.model)
        self._patch.wrap(self.model, "create_masks_for_generate", self._masks_for_generate, original=stock)
        setattr(self.model, PRUNER, self)

    def remove(self) -> None:
        self._patch.restore()
        delattr(self.model, PRUNER)

    # -- vision side -----------------------------------------------------------------------

    def _encoder(self, modality: Modality) -> Callable[..., Any]:
        def wrapper(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            return self._encode(modality, original, args, kwargs)

        return self._outermost(wrapper)

    def _encode(self, modality: Modality, original: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        items = self.vision.items(modality, arguments)
        needs = self.settings.method.needs
        texts = self._instructions(modality, items, arguments) if "text" in needs else None
        chosen: dict[str, Any] = {}

        with ExitStack() as stack:
            tap = stack.enter_context(self.vision.tap(modality, arguments, needs))

            def on_features(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
                features = tap.features(inputs)
                projected = tap.project(inputs) if "projected" in needs else None
                joint = None if self.clip is None else self.clip.image_embeds(self.model.model.vision_tower, features)
                keep, important, replaced = select_tokens(
                    self.settings, items, features, tap.attention(), tap.keys(), projected,
                    self.family.shared_piece_budget, texts, joint,
                )
                chosen.update(keep=keep, important=important)
                return None if replaced is None else tap.substitute(inputs, replaced.to(features.dtype))

            handle = tap.module.register_forward_pre_hook(on_features)
            stack.callback(handle.remove)
            output = original(*args, **kwargs)

        if "keep" not in chosen:
            raise RuntimeError(f"{type(tap.module).__name__} did not run inside {modality.encoder}")
        sizes = [item.size for item in items]
        keeps = chosen["keep"].split(sizes)
        importants = [None] * len(items) if chosen["important"] is None else chosen["important"].split(sizes)
        selections = [
            ImageSelection.of_item(k, i, item, modality.name) for k, i, item in zip(keeps, importants, items)
        ]
        self.last = selections
        if isinstance(output.pooler_output, torch.Tensor):
            output.pooler_output = list(output.pooler_output)
            setattr(output, STACKED, True)
        packed = self.vision.pack(modality, [selection.keep for selection in selections], arguments)
        features = output.pooler_output if hasattr(output, "pooler_output") else output[1]
        if len(features) != len(packed):
            # The stock output groups items otherwise (SmolVLM: a prompt's tiles concatenated); one
            # tensor per item instead, which generate() and the forward regroup as they need.
            output.pooler_output = features = list(torch.cat(list(features)).split([len(mask) for mask in packed]))
        for image, mask, selection in zip(features, packed, selections):
            if image.shape[0] != mask.shape[0]:
                raise RuntimeError(f"an image has {image.shape[0]} feature rows but {mask.shape[0]} packed keep flags")
            setattr(image, KEEP, mask.to(image.device))
            setattr(image, SELECTION, selection)
        return output

    def _instructions(self, modality: Modality, items: list[Item], arguments: dict[str, Any]) -> list[torch.Tensor]:
        """Per item, its prompt row's instruction embeddings (see :mod:`.instruction`), or with
        ``clip`` the CLIP text embeddings of its row's question (:func:`vispruner.instructions`)."""
        name = self.settings.method.name
        if self._prompt is None or self._prompt[0] is None:
            raise ValueError(
                f"{name} selects by the instruction: call the model's generate() or forward() with input_ids "
                f"and {modality.pixels}, not model.model.{modality.encoder} alone"
            )
        input_ids, mask = self._prompt
        flags = [_by_piece(torch.ones(item.size, dtype=torch.bool, device=input_ids.device), item) for item in items]
        sizes = [len(packed) for packed in self.vision.pack(modality, flags, arguments)]
        counts = items_per_row(input_ids == getattr(self.model.config, modality.token_id), sizes)
        if counts is None:
            raise ValueError(
                f"{name} reads each image's instruction from its prompt row, but the {modality.name} placeholders "
                f"of input_ids do not match the {len(items)} {modality.name}(s) given"
            )
        if self.clip is not None:
            if self.texts is None or len(self.texts) != len(counts):
                got = "none" if self.texts is None else f"{len(self.texts)}"
                raise ValueError(
                    f"{name} with clip embeds each prompt row's question with CLIP's text tower: call the model inside "
                    f"`with vispruner.instructions(model, questions):` with one question per row of input_ids "
                    f"({len(counts)}); got {got}"
                )
            rows = [row for row, count in enumerate(counts) if count]
            embeds = self.clip.text_embeds([self.texts[row] for row in rows], input_ids.device)
            return [embed for embed, row in zip(embeds, rows) for _ in range(counts[row])]
        placeholders = [getattr(self.model.config, other.token_id) for other in self.family.modalities]
        return instruction_embeddings(self.model, input_ids, mask, placeholders, counts)

    # -- language side ---------------------------------------------------------------------

    def _generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        cache_names = hf_seam.cache_names(type(self.model).forward)
        hf_seam.check_generate(original, arguments, self.family.arguments.union(cache_names))
        visual = arguments.get("mm_encoder_outputs") is not None or any(
            arguments.get(modality.pixels) is not None for modality in self.family.modalities
        )
        if visual:
            config = arguments.get("generation_config") or self.model.generation_config
            for name, feature in UNSUPPORTED_GENERATE.items():
                value = arguments[name] if name in arguments else getattr(config, name, None)
                if value is not None and value is not False:
                    shown = repr(value) if isinstance(value, (int, float, str)) else type(value).__name__
                    raise NotImplementedError(
                        f"{feature} ({name}={shown}) is not supported on a pruned model with images; "
                        "leave it unset, or vispruner.remove(model) first"
                    )
            refuse_wrong_repeats(self.model, self.family, arguments)
        inputs = arguments.get("input_ids") if arguments.get("input_ids") is not None else arguments.get("inputs")
        with self._prompt_of(inputs, arguments.get("attention_mask")):
            return original(*args, **kwargs)

    @contextmanager
    def _prompt_of(self, input_ids: Any, attention_mask: Any) -> Iterator[None]:
        """Note the prompt of the outermost generate() or forward() call for :meth:`_instructions`."""
        if self._prompt is not None or not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point():
            yield
            return
        self._prompt = (input_ids, attention_mask)
        try:
            yield
        finally:
            self._prompt = None

    def _forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        cache = hf_seam.cache_in(arguments, original, f"{type(self.model).__name__}.forward", self.family.arguments)
        past = hf_seam.cached_length(cache)
        if past == 0 and hasattr(cache, PREFIX):
            delattr(cache, PREFIX)  # a reset cache: static caches are reused across generate() calls
        encoded = dict(arguments.get("mm_encoder_outputs") or {})
        for modality in self.family.modalities:
            pixels = arguments.get(modality.pixels)
            if encoded.get(modality.name) is None and pixels is not None and pixels.shape[0] > 0:
                encoder = getattr(self.model.model, modality.encoder)
                extra = {name: arguments.get(name) for name in modality.arguments}
                with self._prompt_of(arguments.get("input_ids"), arguments.get("attention_mask")):
                    encoded[modality.name] = encoder(**{modality.pixels: pixels}, **extra, return_dict=True)
                arguments[modality.pixels] = None
                arguments["mm_encoder_outputs"] = encoded
        present = [modality for modality in self.family.modalities if encoded.get(modality.name) is not None]
        if not present:
            return original(**self._after_prefill(arguments, cache, past))
        if past:
            raise NotImplementedError(
                "vispruner prunes images in the first forward of a KV cache; images in a later chunk "
                "(prefill_chunk_size, or continuing a cache with a new image) are not supported"
            )
        return self._prefill(original, arguments, encoded, present)

    def _after_prefill(self, arguments: dict[str, Any], cache: Any, past: int) -> dict[str, Any]:
        prefix: CompactedPrefix | None = getattr(cache, PREFIX, None)
        if prefix is None:
            return arguments
        inputs = arguments.get("input_ids")
        if inputs is None:
            inputs = arguments["inputs_embeds"]
        new = inputs.shape[1]
        positions = self.family.positions.step(self.model, arguments, prefix, past, new)
        arguments["attention_mask"] = prefix.mask(arguments.get("attention_mask"), past, new)
        arguments["position_ids"] = positions
        return arguments

    def _prefill(
        self, original: Callable[..., Any], arguments: dict[str, Any], encoded: dict[str, Any], present: list[Modality]
    ) -> Any:
        input_ids, embeds = arguments.get("input_ids"), arguments.get("inputs_embeds")
        keep: torch.Tensor | None = None
        selections: list[ImageSelection] = []
        all_masks: dict[str, list[torch.Tensor]] = {}
        for modality in present:
            features = list(encoded[modality.name].pooler_output)
            masks = [getattr(item, KEEP, None) for item in features]
            if any(mask is None for mask in masks):
                raise ValueError(
                    f"mm_encoder_outputs[{modality.name!r}] was computed without vispruner (or copied, which drops "
                    f"the keep masks); pass {modality.pixels}, or compute it with the patched "
                    f"model.model.{modality.encoder}"
                )
            selections += [getattr(item, SELECTION) for item in features]
            all_masks[modality.name] = masks
            is_item = self._placeholders(modality, input_ids, embeds, arguments.get("mm_token_type_ids"))
            item_keep = torch.cat(masks).to(is_item.device)
            if int(is_item.sum()) != item_keep.numel():
                keep = None
                break
            if keep is None:
                keep = torch.ones_like(is_item)
            keep[is_item] = item_keep
        self.last = selections
        if keep is None or bool(keep.all()):
            # Nothing to prune, or a placeholder mismatch the stock forward reports in its own words.
            reference = input_ids if input_ids is not None else embeds[..., 0]
            self.last_tokens = torch.ones(reference.shape, dtype=torch.bool, device=reference.device)
            stock = {}
            for modality in present:
                if getattr(encoded[modality.name], STACKED, False):
                    stock[modality.name] = type(encoded[modality.name])(**encoded[modality.name])
                    stock[modality.name].pooler_output = torch.stack(list(encoded[modality.name].pooler_output))
            if stock:
                arguments["mm_encoder_outputs"] = {**encoded, **stock}
            return original(**arguments)
        if isinstance(arguments.get("logits_to_keep"), torch.Tensor):
            raise NotImplementedError("logits_to_keep as a tensor of positions is not supported with pruning; pass an int")

        positions = self.family.positions.prefill(self.model, arguments)
        others = {name: arguments[name] for name in self.family.streams if arguments.get(name) is not None}
        if positions is not None:
            others["_positions"] = positions[1:].permute(1, 2, 0)
        short = compact(
            keep,
            input_ids=input_ids,
            inputs_embeds=embeds,
            attention_mask=arguments.get("attention_mask"),
            position_ids=arguments.get("position_ids") if positions is None else positions[0],
            labels=arguments.get("labels"),
            others=others,
            pad_token_id=self._pad_token_id(),
            positions=self.settings.positions,
        )
        position_ids = short.position_ids
        if positions is not None:
            position_ids = torch.cat([short.position_ids.unsqueeze(0), short.others.pop("_positions").permute(2, 0, 1)])
        kept_outputs = {}
        for modality in present:
            output = encoded[modality.name]
            masks = all_masks[modality.name]
            kept = type(output)(**output)
            kept.pooler_output = [item[mask.to(item.device)] for item, mask in zip(output.pooler_output, masks)]
            if getattr(output, STACKED, False):
                # One row per item where they keep equally many (SmolVLM up to 5.20 splits the
                # placeholders by that count); else one row, which the others scatter in order.
                rows = kept.pooler_output
                same = len({len(row) for row in rows}) == 1
                kept.pooler_output = torch.stack(rows) if same else torch.cat(rows).unsqueeze(0)
            for name in self.family.item_streams:
                layers = getattr(output, name, None)
                if layers is not None:
                    setattr(kept, name, [[t[m.to(t.device)] for t, m in zip(layer, masks)] for layer in layers])
            kept_outputs[modality.name] = kept
        arguments.update(
            input_ids=short.input_ids,
            inputs_embeds=short.inputs_embeds,
            attention_mask=short.attention_mask,
            position_ids=position_ids,
            labels=short.labels,
            mm_encoder_outputs={**encoded, **kept_outputs},
            **short.others,
        )
        output = original(**arguments)
        cache = hf_seam.cache_of(output)
        if cache is not None:
            setattr(cache, PREFIX, short.prefix)
        self.last_tokens = short.keep
        return output

    def _placeholders(
        self, modality: Modality, input_ids: torch.Tensor | None, embeds: torch.Tensor | None,
        token_types: torch.Tensor | None,
    ) -> torch.Tensor:
        if input_ids is not None:
            return modality.placeholders(self.model.config, input_ids, token_types)
        token_id = getattr(self.model.config, modality.token_id)
        token = torch.tensor(token_id, device=embeds.device)
        return (embeds == self.model.get_input_embeddings()(token)).all(dim=-1)

    def _pad_token_id(self) -> int:
        # Any id but a placeholder works: padding is masked, and it must not count as a placeholder.
        config = self.model.config
        placeholders = {getattr(config, modality.token_id) for modality in self.family.modalities}
        text = getattr(config, "text_config", None)
        candidates = (getattr(text, "pad_token_id", None), getattr(config, "pad_token_id", None), 0, 1, 2)
        return next(c for c in candidates if c is not None and c not in placeholders)

    def _masks_for_generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        cache = hf_seam.cache_in(arguments, original, "create_masks_for_generate", self.family.arguments)
        if arguments.get("is_first_iteration") or hasattr(cache, PREFIX):
            return arguments.get("attention_mask")
        return original(*args, **kwargs)


def refuse_wrong_repeats(model: nn.Module, family: Family, arguments: dict[str, Any]) -> None:
    """``NotImplementedError`` for a ``generate()`` call (its ``arguments``) that copies prompts
    (beams, ``num_return_sequences``) holding several images or a video, when the family's stock
    ``generate()`` fills such copies with the wrong images (``family.repeats_wrongly``)."""
    if family.repeats_wrongly is None:
        return
    config = arguments.get("generation_config") or model.generation_config
    copies = {name: arguments.get(name, getattr(config, name, 1)) or 1 for name in ("num_beams", "num_return_sequences")}
    name, count = max(copies.items(), key=lambda item: item[1])
    if count == 1:
        return
    ids = arguments.get("input_ids")
    videos = any(arguments.get(m.pixels) is not None for m in family.modalities if m.name == "video")
    several = False
    if ids is not None:
        image = next(m for m in family.modalities if m.name == "image")
        is_image = image.placeholders(model.config, ids, arguments.get("mm_token_type_ids"))
        starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
        several = bool((starts.sum(dim=1) > 1).any())
    if videos or several:
        raise NotImplementedError(
            f"{name}={count} with a prompt holding several images or a video is refused on {family.name}: "
            f"{family.repeats_wrongly}; give such prompts one image each, or generate one sequence per prompt"
        )


def select_tokens(
    settings: Settings,
    items: list[Item],
    features: torch.Tensor,
    scores: torch.Tensor | None,
    keys: torch.Tensor | None,
    projected: torch.Tensor | None,
    shared_piece_budget: bool = False,
    texts: list[torch.Tensor] | None = None,
    joint: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the method on (T, C) features; return (T,) keep, important and (T, C) features.

    ``joint``: (T, E) the tokens in CLIP's joint space, for CDPruner's ``clip`` option.

    The budget's unit is a piece (``budget="per_crop"``) or a whole item (``"per_image"``,
    its pieces stacked vertically into one grid, so the method spends the budget where the
    item needs it). Units of equal size, grid and budget share one batch; with ``texts`` (per
    item, its instruction) only the units of one item do.
    """
    units: dict[tuple[int, tuple[int, int] | None, int, int], list[int]] = {}
    start = 0
    for owner, item in enumerate(items):
        owner = owner if texts is not None else -1
        grids = item.grids
        if settings.budget == "per_crop":
            if shared_piece_budget and settings.keep_ratio is None:
                budgets = shared_tokens(settings.num_tokens, item.pieces)
            elif settings.keep_ratio is None:
                budgets = [settings.num_tokens * crops for crops in item.crops or (1,) * len(grids)]
            else:
                budgets = [settings.tokens_for(rows * cols) for rows, cols in grids]
            for (rows, cols), budget in zip(grids, budgets):
                units.setdefault((rows * cols, (rows, cols), budget, owner), []).append(start)
                start += rows * cols
        else:
            # The pieces stacked vertically: one grid when their widths agree.
            grid = (sum(rows for rows, _ in grids), grids[0][1]) if len({c for _, c in grids}) == 1 else None
            units.setdefault((item.size, grid, settings.tokens_for(item.size), owner), []).append(start)
            start += item.size

    keep = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    important = None
    replaced = None
    for (size, grid, budget, owner), starts in units.items():
        offsets = torch.arange(size, device=features.device)
        index = (torch.tensor(starts, device=features.device).unsqueeze(1) + offsets).flatten()
        count = len(starts)

        def gather(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[index].reshape(count, size, *values.shape[1:])

        signals = VisionSignals(
            features=gather(features),
            attention=gather(scores),
            keys=gather(keys),
            grid=grid,
            projected=gather(projected),
            text=None if texts is None else texts[owner],
            joint=gather(joint),
        )
        with torch.no_grad():
            selection = settings.method.select(signals, budget, **settings.options)
        keep[index] = selection.keep.flatten()
        if selection.important is not None:
            if important is None:
                important = torch.zeros_like(keep)
            important[index] = selection.important.flatten()
        if selection.features is not None:
            if replaced is None:
                replaced = features.clone()
            replaced[index] = selection.features.reshape(count * size, -1).to(features.dtype)
    return keep, important, replaced


def _by_piece(flags: torch.Tensor, item: Item) -> torch.Tensor:
    """An item's (T,) flags as (pieces, N) when its pieces are alike, else as one (1, T) row."""
    return flags.view(item.pieces, -1) if item.uniform else flags.unsqueeze(0)

