"""CDPruner: keep the visual tokens that a conditional DPP on instruction relevance finds most diverse.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", NeurIPS 2025, https://arxiv.org/abs/2506.10967. Reproduces the authors'
``LlavaMetaForCausalLM.encode_images`` at github.com/Theia-4869/CDPruner commit 9541616
(docs/methods.md lists what is exact and what differs).
"""

from __future__ import annotations

import numbers

import torch

from . import _graphs
from ._checks import check_features, check_finite, check_num_tokens, require_signal
from .base import Method, Selection, VisionSignals, register


def cdpruner_selection(
    features: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    num_tokens: int,
    *,
    theta: float | None = None,
    flip_relevance: bool = True,
) -> torch.Tensor:
    """Choose ``min(num_tokens, N)`` tokens per row by greedy MAP inference of a conditional DPP.

    Args:
        features: (B, N, D) the features whose cosine similarity makes the DPP kernel (the
            authors: the projected visual tokens, the language model's input). B rows are the
            crops of one call; each keeps its own tokens.
        image_embeds: (B, N, E) the same tokens in the joint space of ``text_embeds`` (the
            authors: CLIP's visual projection of the patch features).
        text_embeds: (M, E) the instruction (the authors: one CLIP text embedding per 77-token
            segment of the question); relevance is the mean over its M rows.
        num_tokens: T >= 1 tokens kept per row; T >= N keeps all N.
        theta: None (the authors' default) or the commented-out option in (0, 1) of their code:
            relevance ``r`` becomes ``exp(theta / (2 (1 - theta)) * r)``.
        flip_relevance: relevance is the *negated* cosine to the instruction, as the authors
            compute it for CLIP (tokens least like the text score highest; their issues #9 and
            #14 say this holds for CLIP only). False: the plain cosine, for the joint spaces
            other than CLIP's.

    Returns:
        (B, N) bool keep mask with exactly ``min(T, N)`` True per row.

    Exactly the authors' computation: unit features ``Fn`` (normalised in their dtype, then
    float32), similarity ``S = Fn Fn^T``; relevance ``r = mean_m(-cos(E_n, T_m))``, min-max
    normalised **over all B x N values at once** (``(r - min + 1e-6) / (max - min)``, the
    coupling of the crops of one LLaVA-NeXT call); kernel ``L = r_i S_ij r_j``; then T rounds
    of Chen et al.'s fast greedy MAP, each taking ``argmax`` of the remaining gains ``d2``
    (ties to the lowest index) in float32.

    Where theirs is not total, this is (their code silently keeps fewer than T tokens there):

    * A zero vector in ``features``, ``image_embeds`` or ``text_embeds`` has cosine 0 to
      everything (theirs: NaN that spreads to the whole selection).
    * Constant relevance (max == min, e.g. identical ``image_embeds``) gives every token
      relevance 1, so the kernel is the plain similarity (theirs: 0/0).
    * Once the largest remaining gain of a row is not above ``N * eps32 * max_i L_ii`` (the
      kernel's rank is spent: exact duplicates, T above the rank, zero features), round-off
      decides nothing: the row takes its remaining tokens by relevance, highest first, ties to
      the lowest index (theirs: ``sqrt`` of a non-positive gain, NaN, repeated indices).
    * T >= N keeps every token (theirs: repeated indices once all are taken).
    """
    features = check_features(features)
    batch, tokens, _ = features.shape
    image_embeds = _check_embeds(image_embeds, "image_embeds", 3, (batch, tokens))
    text_embeds = _check_embeds(text_embeds, "text_embeds", 2, ())
    if image_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"image_embeds and text_embeds must share their last dimension (the joint space); got "
            f"{image_embeds.shape[-1]} and {text_embeds.shape[-1]}"
        )
    alpha = _check_theta(theta)
    count = min(check_num_tokens(num_tokens), tokens)
    if count == tokens:
        return torch.ones(batch, tokens, dtype=torch.bool, device=features.device)

    # The authors' expressions, operation for operation, so that float32 rounding matches theirs.
    unit = _unit(features).float()
    similarity = torch.matmul(unit, unit.transpose(1, 2))
    relevance = torch.matmul(_unit(image_embeds.float()), _unit(text_embeds.float()).t())
    relevance = (-relevance if flip_relevance else relevance).mean(dim=-1)
    low, high = relevance.min(), relevance.max()
    if bool(high > low):
        relevance = (relevance - low + 1e-6) / (high - low)
    else:
        relevance = torch.ones_like(relevance)
    if alpha is not None:
        relevance = torch.exp(alpha * relevance)
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)
    # On a GPU: one CUDA graph launch per call (see _graphs); elsewhere, the same code eagerly.
    (keep,) = _graphs.run(_greedy_map, (kernel, relevance), count)
    return keep


def _greedy_map(kernel: torch.Tensor, relevance: torch.Tensor, count: int) -> tuple[torch.Tensor]:
    """(B, N, N) kernel -> (B, N) keep mask of ``count`` tokens per row (see the fallback above).
    It reads nothing back to the host, so that a CUDA graph can capture it."""
    batch, tokens, _ = kernel.shape
    device = kernel.device
    rows = torch.arange(batch, device=device)
    cis = torch.zeros((count, batch, tokens), device=device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    spent = tokens * torch.finfo(torch.float32).eps * di2s.amax(dim=1)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    for i in range(count):
        j = torch.argmax(di2s, dim=-1)
        exhausted = ~(di2s[rows, j] > spent)  # also catches NaN
        # Computed whether or not a row is exhausted: asking would read the device every step.
        by_relevance = relevance.masked_fill(keep, -torch.inf).argmax(dim=-1)
        j = torch.where(exhausted, by_relevance, j)
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(
            di2s[rows, j]
        ).unsqueeze(-1)
        eis = torch.where(exhausted.unsqueeze(-1), 0.0, eis)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
        keep[rows, j] = True
    return (keep,)


def _unit(values: torch.Tensor) -> torch.Tensor:
    norm = values.norm(dim=-1, keepdim=True)
    # x / ||x|| as the authors write it; a zero vector stays zero instead of becoming NaN.
    return torch.where(norm > 0, values / norm, torch.zeros((), dtype=values.dtype, device=values.device))


def _check_embeds(value: object, name: str, rank: int, leading: tuple[int, ...]) -> torch.Tensor:
    shape = "(B, N, E)" if rank == 3 else "(M, E)"
    if not isinstance(value, torch.Tensor) or value.ndim != rank or not value.is_floating_point():
        got = f"shape {tuple(value.shape)}, dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor of shape {shape}; got {got}")
    if tuple(value.shape[: len(leading)]) != leading:
        raise ValueError(f"{name} must have leading dimensions (B, N) = {leading} like features; got {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} must have no empty dimension; got shape {tuple(value.shape)}")
    check_finite(value, name)
    return value


def _check_theta(theta: object) -> float | None:
    if theta is None:
        return None
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not 0 < theta < 1:
        raise ValueError(f"theta must be None or a number in (0, 1); got {theta!r}")
    return float(theta) / (2 * (1 - float(theta)))


def _from_signals(signals: VisionSignals, num_tokens: int, clip: object = None) -> Selection:
    projected = require_signal(signals, "projected", "cdpruner")
    text = require_signal(signals, "text", "cdpruner")
    if clip is not None:
        # Paper-exact (adapters/clip_joint.py): the relevance in CLIP's joint space, the patches'
        # visual projection against CLIP's text embeddings of the question. The adapter computed
        # both with the ``clip`` model; here its presence only selects those signals.
        joint = require_signal(signals, "joint", "cdpruner")
        return Selection(keep=cdpruner_selection(projected, joint, text.to(joint.device), num_tokens))
    # The variant for models without CLIP's joint space (docs/methods.md): the projected visual
    # tokens are both the features and the image side of the relevance, the instruction's
    # input embeddings its text side. The authors' negated cosine is kept: on the bundled
    # testbed the plain cosine lost 21 points at 7 tokens (docs/testbed.md).
    keep = cdpruner_selection(projected, projected, text.to(projected.device), num_tokens)
    return Selection(keep=keep)


def _check_clip(value: object, name: str) -> object:
    # The CLIP model is model plumbing: the adapters load and validate it (once, here).
    from ..adapters.clip_joint import load_clip

    return None if value is None else load_clip(value, name)


METHOD = register(
    Method(
        name="cdpruner",
        select=_from_signals,
        paper="https://arxiv.org/abs/2506.10967",
        summary="conditional DPP: the most diverse tokens weighted by their relevance to the instruction",
        needs=frozenset({"projected", "text"}),
        options={"clip": _check_clip},
    )
)
