"""LLM-stage pruning (FastV, DART) for LLaVA-style models: cut image tokens between two decoder layers.

Decoder layers ``0 .. K-1`` run on the whole prompt; layer ``K`` and the ones after it see the
text and the kept image tokens only, at the prefill and in the KV cache they fill, so decoding
runs on the shortened cache. Where transformers 5.x lets us in:

* ``model.model.get_image_features`` is wrapped to note each image's crops; ``model.forward`` is
  wrapped so that at the prefill (an empty cache) the image placeholders of ``input_ids`` are
  grouped per image or per crop (LLaVA-NeXT's newline tokens are always kept).
* The language model's ``forward`` is wrapped to note the call's 2D padding mask and cache.
* During the prefill, hooks on layer ``K-1``'s attention and its query and key projections take
  the projections the layer computes anyway and score only the attention row of each prompt's
  last token (one query against the L keys), so SDPA and FlashAttention keep working; eager
  attention is never required. For DART they keep the layer's post-RoPE keys instead, and the
  cut passes its input (layer ``K-1``'s output) through the model's final norm, as the authors do.
* A pre-hook on every layer from ``K`` on substitutes the shortened inputs: at the prefill,
  layer ``K`` selects the tokens and compacts the hidden states (rows re-padded on the left),
  the 2D mask and the rotary embeddings; kept tokens keep their original positions, as in the
  authors' code. At later steps those layers get a mask built from the
  compacted 2D mask, since their cache is shorter than the first ``K`` layers'.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from ..methods.dart import DartSignals
from ..methods.fastv import DEFAULT_LAYER, LanguageSignals, check_layer
from .attention_row import ProjectionCapture, head_averaged_row
from .patching import InstancePatch, Outermost, bind_arguments
from .sequence import CompactedPrefix, CompactedSequence, compact
from . import hf_seam
from .budget import shared_tokens
from .vision_stage import PRUNER, Family, ImageSelection, Item, Modality, Settings, refuse_wrong_repeats

#: Attribute of a KV cache whose layers from K on hold a compacted prefill: its :class:`CompactedPrefix`.
PREFIX = "_vispruner_llm_prefix"


@dataclass
class _Step:
    """What the hooks share during one language-model forward."""

    attention_mask: torch.Tensor | None
    #: (B, L) long group ids of the prompt's tokens (-1 = always kept); set at the prefill only.
    groups: torch.Tensor | None = None
    #: (B, L) attention of each prompt's last token, set by the hooks on layer K-1's attention.
    scores: torch.Tensor | None = None
    #: (B, L, H*hd) layer K-1's post-RoPE keys, set instead for methods that need "keys" (DART).
    keys: torch.Tensor | None = None
    #: Keyword arguments every layer from K on receives instead of the model's.
    replacements: dict[str, Any] = field(default_factory=dict)
    prefix: CompactedPrefix | None = None
    #: The prefill's compaction at layer K (None before the cut or without one).
    short: CompactedSequence | None = None


@dataclass
class _Placed:
    """One item where it stands in the prompt: its placeholder sources (see ``_sources``), and
    whether it is the first copy of its row (beam search repeats rows)."""

    item: Item
    sources: torch.Tensor
    first_copy: bool


class LanguageStagePruner:
    """FastV-style pruning (FastV, DART) installed on one model instance; :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module, family: Family, settings: Settings) -> None:
        self.model = model
        self.family = family
        self.language_model = model.get_decoder()  # model.model.language_model; SmolVLM: text_model
        self.layers = self.language_model.layers
        options = dict(settings.options)
        self.layer = check_layer(options.pop("layer", DEFAULT_LAYER), len(self.layers))
        self.settings = replace(settings, options=options)
        _check_language_model(self.language_model, self.layer, settings.method.name)
        self.vision = family.vision(model)
        #: Per image (then per video) at the last pruned prefill: keep masks over the token grids.
        self.last: list[ImageSelection] | None = None
        #: (B, L) bool: the prompt tokens that decoder layers from K on saw at the last prefill.
        self.last_tokens: torch.Tensor | None = None
        #: Per modality, the items of its last feature call, and that call's arguments.
        self._items: dict[str, list[Item]] = {}
        self._encoder_arguments: dict[str, dict[str, Any]] = {}
        #: input_ids (and mm_token_type_ids, if given) of the prefill under way; per modality
        #: present, its items in reading order.
        self._prompt_ids: torch.Tensor | None = None
        self._prompt_types: torch.Tensor | None = None
        self._placed_now: dict[str, list[_Placed]] = {}
        #: Token budget of each group id of the prefill under way.
        self._budgets: dict[int, int] = {}
        self._step: _Step | None = None
        self._patch = InstancePatch()
        self._handles: list[Any] = []
        self._outermost = Outermost()

    def install(self) -> None:
        for modality in self.family.modalities:
            self._patch.wrap(self.model.model, modality.encoder, self._encoder(modality))
        self._patch.wrap(self.model, "forward", self._forward)
        if self.family.repeats_wrongly is not None:
            self._patch.wrap(self.model, "generate", self._generate)
        self._patch.wrap(self.language_model, "forward", self._language_forward)
        if hasattr(self.language_model, "_deepstack_process"):
            self._patch.wrap(self.language_model, "_deepstack_process", self._deepstack)
        self._handles = [self.layers[self.layer].register_forward_pre_hook(self._cut, with_kwargs=True)]
        self._handles += [
            layer.register_forward_pre_hook(self._follow, with_kwargs=True) for layer in self.layers[self.layer + 1 :]
        ]
        setattr(self.model, PRUNER, self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._patch.restore()
        delattr(self.model, PRUNER)

    # -- which tokens compete ------------------------------------------------------------------

    def _encoder(self, modality: Modality) -> Callable[..., Any]:
        def wrapper(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            arguments = bind_arguments(original, args, kwargs)
            self._encoder_arguments[modality.name] = arguments
            self._items[modality.name] = self.vision.items(modality, arguments)
            return original(*args, **kwargs)

        return self._outermost(wrapper)

    def _generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        refuse_wrong_repeats(self.model, self.family, bind_arguments(original, args, kwargs))
        return original(*args, **kwargs)

    def _forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        cache = hf_seam.cache_in(arguments, original, f"{type(self.model).__name__}.forward", self.family.arguments)
        encoded = arguments.get("mm_encoder_outputs") or {}
        images = any(
            arguments.get(modality.pixels) is not None or encoded.get(modality.name) is not None
            for modality in self.family.modalities
        )
        if hf_seam.cached_length(cache) == 0:
            self.last_tokens = None
            if images:
                if arguments.get("input_ids") is None:
                    raise NotImplementedError(
                        f"{self.settings.method.name} finds the image (and video) tokens in input_ids; got inputs_embeds only"
                    )
                # Grouped inside the language model's call: the image features (and with them the
                # crops of each image) are computed after this point when pixel_values are given.
                self._prompt_ids = arguments["input_ids"]
                self._prompt_types = arguments.get("mm_token_type_ids")
        labels = arguments.pop("labels", None)
        try:
            output = original(**arguments)
        finally:
            self._prompt_ids = self._prompt_types = None
        if labels is not None:
            if self.last_tokens is not None:
                labels = compact(self.last_tokens.to(labels.device), labels=labels).labels
            output.loss = self.model.loss_function(
                logits=output.logits, labels=labels, vocab_size=self.model.config.text_config.vocab_size
            )
        return output

    def _token_groups(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[_Placed]]] | None:
        """(B, L) group ids of the prompt, and per modality its items in reading order (see
        :meth:`_placements`); sets the budget of each group."""
        groups = torch.full_like(input_ids, -1)
        placed_now: dict[str, list[_Placed]] = {}
        self._budgets = {}
        settings = self.settings
        for modality in self.family.modalities:
            is_item = modality.placeholders(self.model.config, input_ids, self._prompt_types)
            if modality.name not in self._items or not bool(is_item.any()):
                continue
            placed = self._placements(modality, is_item)
            if placed is None:
                return None  # a placeholder mismatch, which the stock forward reports in its own words
            flat = torch.cat([entry.sources for entry in placed])
            lengths = torch.tensor([len(entry.sources) for entry in placed], device=flat.device)
            index = torch.repeat_interleave(torch.arange(len(placed), device=flat.device), lengths)
            first = len(self._budgets)
            if settings.budget == "per_crop":
                pieces = [entry.item.pieces for entry in placed]
                first_piece = torch.tensor([0, *pieces[:-1]], device=flat.device).cumsum(0)
                per_piece = torch.tensor([entry.item.per_piece for entry in placed], device=flat.device)
                owner = first + first_piece[index] + flat.div(per_piece[index], rounding_mode="floor")
                for entry in placed:
                    shares = [settings.num_tokens] * entry.item.pieces
                    if self.family.shared_piece_budget and settings.keep_ratio is None:
                        shares = shared_tokens(settings.num_tokens, entry.item.pieces)
                    self._budgets.update((len(self._budgets), share) for share in shares)
            else:
                owner = first + index
                self._budgets.update((len(self._budgets), settings.num_tokens) for _ in placed)
            groups[is_item] = torch.where(flat >= 0, owner, -1)
            placed_now[modality.name] = placed
        if not placed_now:
            return None
        if settings.keep_ratio is not None:
            ids, sizes = torch.unique(groups[groups >= 0], return_counts=True)
            self._budgets = {group: settings.tokens_for(size) for group, size in zip(ids.tolist(), sizes.tolist())}
        return groups, placed_now

    def _placements(self, modality: Modality, is_item: torch.Tensor) -> list[_Placed] | None:
        """The modality's items in reading order over the batch, or None if they do not fit.

        Beam search and ``num_return_sequences`` repeat each prompt (consecutive rows) after the
        features were computed: each copy of a row then holds the same items again.
        """
        items = self._items[modality.name]
        sources = self._sources(modality, is_item.device)
        total, found = sum(len(s) for s in sources), int(is_item.sum())
        copies = found // total if total else 0
        if copies == 0 or found != copies * total or is_item.shape[0] % copies:
            return None
        placed, pointer = [], 0
        for count in is_item[::copies].sum(dim=1).tolist():
            taken, size = [], 0
            while size < count and pointer < len(items):
                taken.append(pointer)
                size += len(sources[pointer])
                pointer += 1
            if size != count:
                return None
            placed += [_Placed(items[i], sources[i], copy == 0) for copy in range(copies) for i in taken]
        return placed

    def _sources(self, modality: Modality, device: torch.device) -> list[torch.Tensor]:
        """Per item, (P,) long: for each of its placeholder tokens, ``piece * N + patch``, or -1 for a
        newline token (LLaVA-NeXT), in the order the model lays them out.

        The family's ``pack`` only moves, drops and inserts newline flags set to True, so packing
        bit ``b`` of every patch's code, one bit at a time, spells out each token's code; a newline
        reads as all ones, a code no patch has.
        """
        codes = [
            torch.arange(item.pieces * item.per_piece, device=device).view(item.pieces, item.per_piece)
            for item in self._items[modality.name]
        ]
        bits = max(code.numel() for code in codes).bit_length()
        total = None
        for bit in range(bits):
            flags = [(code >> bit) & 1 == 1 for code in codes]
            packed = self.vision.pack(modality, flags, self._encoder_arguments[modality.name])
            planes = [flags.to(device).long() << bit for flags in packed]
            total = planes if total is None else [t + p for t, p in zip(total, planes)]
        newline = (1 << bits) - 1
        return [torch.where(code == newline, -1, code) for code in total]

    # -- inside the language model -------------------------------------------------------------

    def _language_forward(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        arguments = bind_arguments(original, args, kwargs)
        cache = hf_seam.cache_in(
            arguments, original, f"{type(self.language_model).__name__}.forward", self.family.arguments
        )
        mask = arguments.get("attention_mask")
        prefill = hf_seam.cached_length(cache) == 0
        if prefill and hasattr(cache, PREFIX):
            delattr(cache, PREFIX)  # a reset cache, reused by a new generate() call
        step = _Step(attention_mask=mask)
        if prefill and self._prompt_ids is not None:
            grouped = self._token_groups(self._prompt_ids)
            if grouped is not None:
                step.groups, self._placed_now = grouped
        if step.groups is not None or hasattr(cache, PREFIX):
            if hf_seam.is_static(cache):
                raise NotImplementedError(
                    f"{self.settings.method.name} needs a dynamic KV cache (the default); static caches are not supported"
                )
            if mask is not None and mask.ndim != 2:
                raise NotImplementedError(
                    f"{self.settings.method.name} needs the 2D (batch, length) padding mask; got shape {tuple(mask.shape)}"
                )
        self._step = step
        attention = self.layers[self.layer - 1].self_attn
        capture = _RotatedKeys if "keys" in self.settings.method.needs else _LastTokenAttention
        try:
            with capture(attention, step) if step.groups is not None else nullcontext():
                output = original(**arguments)
        finally:
            self._step = None
        cache = hf_seam.cache_of(output)
        if step.prefix is not None and cache is not None:
            setattr(cache, PREFIX, step.prefix)
        return output

    def _cut(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Pre-hook on layer K: choose and compact at the prefill; at later steps, fix the mask."""
        step = self._step
        if step is None:
            return None
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        args = args[1:] if args else args
        cache = hf_seam.cache_in(kwargs, type(layer).forward, f"decoder layer {self.layer}")
        if step.groups is not None:
            if step.scores is None and step.keys is None:
                raise RuntimeError(f"the attention of decoder layer {self.layer - 1} did not run before layer {self.layer}")
            keep = self._choose(self._signals(step, hidden), step.groups.to(hidden.device))
            self._record(keep)
            if bool(keep.all()):
                step.groups = None
                return None
            hidden = self._compact_prefill(step, keep.to(hidden.device), hidden, kwargs, cache)
        elif hasattr(cache, PREFIX):
            prefix: CompactedPrefix = getattr(cache, PREFIX)
            mask = prefix.mask(step.attention_mask, hf_seam.cached_length(cache, self.layer), hidden.shape[1])
            step.replacements = {"attention_mask": self._mask(hidden, mask, cache)}
        else:
            return None
        return (hidden, *args), {**kwargs, **step.replacements}

    def _follow(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Pre-hook on layers after K: the same shortened inputs as layer K."""
        step = self._step
        if step is None or not step.replacements:
            return None
        return args, {**kwargs, **step.replacements}

    def _compact_prefill(
        self, step: _Step, keep: torch.Tensor, hidden: torch.Tensor, kwargs: dict[str, Any], cache: Any
    ) -> torch.Tensor:
        batch, length = keep.shape
        short = compact(keep, inputs_embeds=hidden, attention_mask=step.attention_mask)
        step.short = short
        self.last_tokens = short.keep  # without the padding, which compact() drops as well

        def along(values: torch.Tensor) -> torch.Tensor:
            return short.gather(values.expand(batch, length, *values.shape[2:]))

        cos, sin = kwargs["position_embeddings"]
        step.replacements = {
            "attention_mask": self._mask(short.inputs_embeds, short.attention_mask, cache),
            "position_embeddings": (along(cos), along(sin)),
            # The rotary embeddings carry the kept tokens' original, gapped positions. Layers read
            # position_ids only to detect packed sequences (FlashAttention, one unpadded row),
            # which gapped positions would fake.
            "position_ids": None,
        }
        step.prefix = short.prefix
        return short.inputs_embeds

    def _deepstack(
        self, original: Callable[..., Any], hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor,
        visual_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """Qwen3-VL adds deepstack features to the visual tokens after early decoder layers; after
        the cut, only to the kept ones."""
        step = self._step
        if step is not None and step.short is not None and visual_pos_masks.shape[1] != hidden_states.shape[1]:
            keep = step.short.keep.to(visual_pos_masks.device)
            visual_embeds = visual_embeds[keep[visual_pos_masks].to(visual_embeds.device)]
            visual_pos_masks = step.short.gather(visual_pos_masks & keep)
        return original(hidden_states, visual_pos_masks, visual_embeds)

    def _mask(self, hidden: torch.Tensor, mask: torch.Tensor | None, cache: Any) -> Any:
        return hf_seam.causal_mask(self.language_model.config, hidden, mask, cache, self.layer)

    def _record(self, keep: torch.Tensor) -> None:
        """Note what the layers from K on see: :attr:`last_tokens`, and :attr:`last` per item."""
        self.last_tokens = keep
        self.last = []
        for modality in self.family.modalities:
            placed = self._placed_now.get(modality.name)
            if placed is None:
                continue
            is_item = modality.placeholders(self.model.config, self._prompt_ids, self._prompt_types)
            kept = keep.to(is_item.device)[is_item].split([len(entry.sources) for entry in placed])
            for entry, flags in zip(placed, kept):
                if not entry.first_copy:
                    continue
                item, sources = entry.item, entry.sources
                grid = torch.zeros(item.pieces * item.per_piece, dtype=torch.bool, device=flags.device)
                grid[sources[flags & (sources >= 0)]] = True
                self.last.append(ImageSelection(grid.view(item.pieces, -1), None, item.grid, modality.name))

    def _signals(self, step: _Step, hidden: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        """``groups -> signals`` of the method: FastV's attention row, or DART's normed hidden
        states, keys and text tokens (not placeholders, not padding)."""
        if step.keys is None:
            return lambda groups: LanguageSignals(step.scores.to(groups.device), groups)
        with torch.no_grad():
            normed = self.language_model.norm(hidden)
        real = torch.ones_like(self._prompt_ids, dtype=torch.bool)
        if step.attention_mask is not None:
            real = step.attention_mask.to(real.device).bool()
        text = real.clone()
        for modality in self.family.modalities:
            text &= self._prompt_ids != getattr(self.model.config, modality.token_id)
        start = real.long().argmax(dim=1)
        return lambda groups: DartSignals(
            normed, step.keys.to(normed.device), groups, text.to(groups.device), start.to(groups.device)
        )

    def _choose(self, signals: Callable[[torch.Tensor], Any], groups: torch.Tensor) -> torch.Tensor:
        """(B, L) keep mask: each group's budget (``num_tokens``, its share, or ``keep_ratio`` of it)."""
        settings = self.settings
        budget_of = torch.full((len(self._budgets) + 1,), -1, dtype=torch.long, device=groups.device)
        for group, budget in self._budgets.items():
            budget_of[group] = budget
        # Groups with equal budgets are chosen together; the others count as always kept meanwhile.
        budgets = torch.where(groups >= 0, budget_of[groups.clamp_min(0)], -1)
        keep = torch.ones_like(groups, dtype=torch.bool)
        for budget in torch.unique(budgets[budgets >= 0]).tolist():
            chosen = torch.where(budgets == budget, groups, -1)
            keep &= settings.method.select(signals(chosen), budget, **settings.options).keep
        return keep


class _LastTokenAttention(ProjectionCapture):
    """Sets ``step.scores``: in a Llama-style attention, each prompt's last real token's attention
    row, heads averaged, with the rotary embedding the layer receives."""

    def __init__(self, attention: nn.Module, step: _Step) -> None:
        super().__init__(attention)
        self._step = step
        self._last: torch.Tensor | None = None
        self._visible: torch.Tensor | None = None
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> "_LastTokenAttention":
        super().__enter__()
        self._handles.append(self.attention.register_forward_pre_hook(self._on_input, with_kwargs=True))
        return self

    def _on_input(self, attention: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # Runs before q_proj and k_proj: which row is each prompt's last, and the rotary embedding.
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, length, _ = hidden.shape
        columns = torch.arange(length, device=hidden.device)
        real = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        if self._step.attention_mask is not None:
            real = self._step.attention_mask.to(hidden.device).bool()
        self._last = torch.where(real, columns, -1).amax(dim=1)
        self._visible = real & (columns <= self._last.unsqueeze(1))
        cos, sin = kwargs["position_embeddings"]
        self._rotary = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)

    def _row(self, query: torch.Tensor) -> torch.Tensor:
        return query[torch.arange(query.shape[0], device=query.device), self._last]

    def _score(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        batch = keys.shape[0]
        rows = torch.arange(batch, device=keys.device)
        cos, sin = self._rotary
        query = query.view(batch, -1, 1, self.attention.head_dim)
        if hasattr(self.attention, "q_norm"):  # Qwen3: per-head RMS norms before the rotary embedding
            query = self.attention.q_norm(query)
        query = self._rotate(query, cos[rows, self._last].unsqueeze(1), sin[rows, self._last].unsqueeze(1))
        self._step.scores = head_averaged_row(query.squeeze(2), self._attended_keys(keys), self.attention.scaling, self._visible)

    def _rotate(self, values: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotate = sys.modules[type(self.attention).__module__].apply_rotary_pos_emb
        return rotate(values, values, cos, sin)[0]

    def _attended_keys(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, L, K * hd) key projection -> (B, K, L, hd) keys as the layer attends with them."""
        batch, length, _ = keys.shape
        keys = keys.view(batch, length, -1, self.attention.head_dim)
        if hasattr(self.attention, "k_norm"):
            keys = self.attention.k_norm(keys)
        return self._rotate(keys.transpose(1, 2), *self._rotary)


class _RotatedKeys(_LastTokenAttention):
    """Sets ``step.keys``: the layer's post-RoPE keys, (B, L, H * hd), key heads repeated to the
    query heads as the authors' ``repeat_kv`` does (DART reads their L1 norm)."""

    def _score(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        keys = self._attended_keys(keys)
        heads = query.shape[-1] // self.attention.head_dim
        keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)
        self._step.keys = keys.transpose(1, 2).flatten(2)


def _check_language_model(language_model: nn.Module, layer: int, method: str) -> None:
    config = language_model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or not all(hasattr(block, "self_attn") for block in language_model.layers):
        raise TypeError(
            f"{method} needs softmax attention in every decoder layer; this language model has {sorted(kinds)} layers "
            "(e.g. Qwen3.5's linear attention); choose a vision-stage method"
        )
    attention = language_model.layers[layer - 1].self_attn
    needed = ("q_proj", "k_proj", "head_dim", "scaling")
    rotary = getattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb", None)
    normed = hasattr(attention, "q_norm") == hasattr(attention, "k_norm")
    if not all(hasattr(attention, name) for name in needed) or rotary is None or not normed:
        raise TypeError(
            f"{method} supports Llama-style language models (rotary q_proj/k_proj attention); got {type(attention).__name__}"
        )
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise TypeError(f"{method} does not support sliding-window attention in the language model")
    if not isinstance(getattr(language_model, "norm", None), nn.Module):
        raise TypeError(f"{method} needs the language model's final norm (language_model.norm)")
