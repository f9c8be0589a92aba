"""DART: inside the language model, keep the image tokens least like a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More", EMNLP 2025, https://arxiv.org/abs/2502.11494. Reproduces
``DART.get_retained_image_token`` of github.com/ZichenWen1/DART at commit 5a19452 (LLaVA,
``modeling_llama_self.py``; docs/methods.md lists what is exact and what differs).

Like FastV, DART runs the first ``layer`` decoder layers on the whole prompt;
:mod:`vispruner.adapters.llm_stage` calls :func:`dart_keep` with what layer ``layer - 1``
computed (its output through the model's final norm, and its post-RoPE keys).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ._checks import check_finite, check_integer, check_num_tokens
from .base import Method, Selection, register

#: The authors' defaults: pivots chosen among the image tokens, and among the text after the image.
PIVOT_IMAGE_TOKENS = 4
PIVOT_TEXT_TOKENS = 4


def dart_selection(
    hidden_states: torch.Tensor,
    key_states: torch.Tensor,
    image_start: int,
    image_length: int,
    budget: float,
    pivot_image_tokens: int = PIVOT_IMAGE_TOKENS,
    pivot_text_tokens: int = PIVOT_TEXT_TOKENS,
) -> torch.Tensor:
    """The image positions the authors' DART keeps for one sequence, under their budget rule.

    Args:
        hidden_states: (S, D) layer K-1's output after the model's final norm (as the authors feed
            it; nothing is normalised here).
        key_states: (S, H*hd) layer K-1's post-RoPE keys, heads concatenated per token.
        image_start: position of the first image token; the image is the span
            ``[image_start, image_start + image_length)`` and everything after it is text.
        image_length: N >= 1 image tokens.
        budget: the authors' ``max_num_trunction`` (>= 0; a float where their ``reduction_ratio``
            fallback makes one): each pivot keeps ``TOKEN_TOPK = ceil(budget // (p_img + p_txt))``
            tokens, so ``p_img + (p_img + p_txt) * TOKEN_TOPK`` are kept (132 for budget 128).
        pivot_image_tokens: p_img >= 0 image pivots, the image tokens of largest key L1 norm.
        pivot_text_tokens: p_txt >= 0 text pivots, the text tokens of largest key L1 norm;
            p_img + p_txt >= 1.

    Returns:
        (R,) long: the kept image positions (absolute), ascending.

    The pivots are visited in the order of ``list(set(image_pivots + text_pivots))`` on Python
    ints, as the authors' loop does; each takes the ``TOKEN_TOPK`` remaining candidates of
    smallest cosine similarity to it (``torch.topk`` of the negated cosine) and removes them
    from the candidates, so the order changes the result. Candidates are listed ascending.
    Where the authors' code raises (fewer image or text tokens than pivots, fewer candidates
    than a pivot's share), this takes what there is: ``min(p, available)`` pivots, and a pivot
    takes ``min(TOKEN_TOPK, remaining candidates)``.
    """
    hidden_states, key_states = _check_states(hidden_states, key_states)
    length = hidden_states.shape[0]
    image_start = check_integer(image_start, "image_start", 0, length - 1)
    image_length = check_integer(image_length, "image_length", 1, length - image_start)
    pivots = _check_pivots(pivot_image_tokens, pivot_text_tokens)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0; got {budget!r}")
    per_pivot = math.ceil(budget // sum(pivots))
    image = torch.arange(image_start, image_start + image_length, device=hidden_states.device)
    text = torch.arange(image_start + image_length, length, device=hidden_states.device)
    kept = _select(hidden_states, key_states, image, text, pivots, lambda count: [per_pivot] * count)
    return torch.tensor(sorted(kept), dtype=torch.long, device=hidden_states.device)


def dart_keep(
    hidden_states: torch.Tensor,
    key_states: torch.Tensor,
    image_positions: torch.Tensor,
    text_positions: torch.Tensor,
    num_tokens: int,
    pivot_image_tokens: int = PIVOT_IMAGE_TOKENS,
    pivot_text_tokens: int = PIVOT_TEXT_TOKENS,
) -> torch.Tensor:
    """Exactly ``min(num_tokens, len(image_positions))`` image positions of one sequence, by DART.

    Args:
        hidden_states, key_states: as in :func:`dart_selection`.
        image_positions: (N,) long, ascending: the image (or crop) tokens that compete.
        text_positions: (T,) long: the text tokens the text pivots are chosen from (the
            authors: every position after the image).
        num_tokens: K >= 1.

    Returns:
        (R,) long kept positions, ascending, R = min(K, N).

    The authors' count is ``p_img + (p_img + p_txt) * TOKEN_TOPK``; for a count K the share
    ``K - p_img`` is split over the visited pivots, the first ``(K - p_img) mod pivots`` in
    visiting order taking one more. For K = 4 + 8 t (the default pivots) that is exactly the
    authors' selection with budget 8 t. For K < p_img the K image tokens of largest key norm
    are kept.
    """
    hidden_states, key_states = _check_states(hidden_states, key_states)
    pivots = _check_pivots(pivot_image_tokens, pivot_text_tokens)
    count = min(check_num_tokens(num_tokens), image_positions.numel())
    if count == image_positions.numel():
        return image_positions.clone()
    pivots = (min(pivots[0], count), pivots[1] if count > pivots[0] else 0)

    def shares(visited: int) -> list[int]:
        extra = count - pivots[0]
        base, more = divmod(extra, visited) if visited else (0, 0)
        return [base + 1] * more + [base] * (visited - more)

    kept = _select(hidden_states, key_states, image_positions, text_positions, pivots, shares)
    return torch.tensor(sorted(kept), dtype=torch.long, device=image_positions.device)


def _select(
    hidden: torch.Tensor,
    keys: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    pivots: tuple[int, int],
    shares,
) -> set[int]:
    """The authors' loop; ``shares(number of pivots)`` gives each visited pivot its count."""
    image_norm = torch.norm(keys[image], p=1, dim=-1)
    text_norm = torch.norm(keys[text], p=1, dim=-1)
    image_pivots = image[image_norm.topk(min(pivots[0], image.numel())).indices].tolist()
    text_pivots = text[text_norm.topk(min(pivots[1], text.numel())).indices].tolist()
    # The authors iterate a set of Python ints: its (hash-slot) order decides which pivot takes
    # its candidates first. Reproduced by building the same set the same way.
    order = list(set(image_pivots + text_pivots))
    candidates = [position for position in image.tolist() if position not in set(image_pivots)]
    kept = set(image_pivots)
    for pivot, share in zip(order, shares(len(order))):
        share = min(share, len(candidates))
        if share == 0:
            continue
        similarity = -torch.nn.functional.cosine_similarity(hidden[pivot, :], hidden[candidates, :], dim=-1)
        chosen = [candidates[i] for i in similarity.topk(share).indices.tolist()]
        kept.update(chosen)
        taken = set(chosen)
        candidates = [position for position in candidates if position not in taken]
    return kept


def _check_states(hidden_states: object, key_states: object) -> tuple[torch.Tensor, torch.Tensor]:
    for value, name, shape in ((hidden_states, "hidden_states", "(S, D)"), (key_states, "key_states", "(S, H*hd)")):
        if not isinstance(value, torch.Tensor) or value.ndim != 2 or not value.is_floating_point() or value.numel() == 0:
            got = f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a non-empty floating-point torch.Tensor of shape {shape}; got {got}")
        check_finite(value, name)
    if key_states.shape[0] != hidden_states.shape[0]:
        raise ValueError(
            f"key_states must have one row per position like hidden_states ({hidden_states.shape[0]}); got {key_states.shape[0]}"
        )
    return hidden_states, key_states


def _check_pivots(image: object, text: object) -> tuple[int, int]:
    image = check_integer(image, "pivot_image_tokens", 0)
    text = check_integer(text, "pivot_text_tokens", 0)
    if image + text == 0:
        raise ValueError("pivot_image_tokens + pivot_text_tokens must be at least 1; got 0 and 0")
    return image, text


@dataclass
class DartSignals:
    """What the language model gives DART, for a batch of B prompts of L tokens.

    Attributes:
        hidden: (B, L, D) decoder layer ``layer - 1``'s output through the model's final norm.
        keys: (B, L, H*hd) that layer's post-RoPE keys (key heads repeated to the query heads).
        groups: (B, L) long; tokens with the same value g >= 0 compete for one budget; -1: kept.
        text: (B, L) bool, the text tokens (not placeholders, not padding): a group's text pivots
            are chosen among those after its last token.
        start: (B,) long, each row's first real token (left padding before it). Positions are
            counted from there, as in the authors' unpadded batch of one: the pivots' visiting
            order depends on their values.
    """

    hidden: torch.Tensor
    keys: torch.Tensor
    groups: torch.Tensor
    text: torch.Tensor
    start: torch.Tensor


def _from_signals(
    signals: DartSignals,
    num_tokens: int,
    pivot_image_tokens: int = PIVOT_IMAGE_TOKENS,
    pivot_text_tokens: int = PIVOT_TEXT_TOKENS,
) -> Selection:
    keep = signals.groups < 0
    candidates = ~keep
    pairs = torch.stack([candidates.nonzero()[:, 0], signals.groups[candidates]], dim=1).unique(dim=0)
    for row, group in pairs.tolist():
        start = int(signals.start[row])
        members = (signals.groups[row, start:] == group).nonzero().flatten()
        after = signals.text[row, start:] & (torch.arange(keep.shape[1] - start, device=keep.device) > members[-1])
        kept = dart_keep(
            signals.hidden[row, start:].float(), signals.keys[row, start:].float(), members, after.nonzero().flatten(),
            num_tokens, pivot_image_tokens, pivot_text_tokens,
        )
        keep[row, kept + start] = True
    return Selection(keep=keep)


METHOD = register(
    Method(
        name="dart",
        select=_from_signals,
        paper="https://arxiv.org/abs/2502.11494",
        summary="prunes image tokens inside the LLM after layer K, keeping those least like key-norm pivots",
        stage="llm",
        needs=frozenset({"hidden", "keys"}),
        options={
            "layer": check_integer,  # the upper bound depends on the model: fastv.check_layer
            "pivot_image_tokens": lambda value, name: check_integer(value, name, 0),
            "pivot_text_tokens": lambda value, name: check_integer(value, name, 0),
        },
    )
)
