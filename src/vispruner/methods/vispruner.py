"""VisPruner: important tokens by [CLS] attention, then diverse tokens by duplicate removal.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning
in VLMs", ICCV 2025, https://arxiv.org/abs/2412.01818
"""

from __future__ import annotations

import torch

from ._checks import check_attention, check_features, check_num_tokens, check_ratio, require_signal
from .base import Method, Selection, VisionSignals, register

#: Tokens the published duplicate removal drops per step.
STEP = 8


def vispruner_selection(
    features: torch.Tensor,
    attention: torch.Tensor,
    num_tokens: int,
    important_ratio: float = 0.5,
) -> Selection:
    """Choose ``min(num_tokens, N)`` tokens per image the way VisPruner does.

    Args:
        features: (B, N, C) patch features of the layer that feeds the projector ([CLS] removed),
            float32, float16 or bfloat16, on any device.
        attention: (B, N) [CLS]-to-patch scores, or (B, H, N) per-head [CLS] attention, which is
            averaged over heads.
        num_tokens: T >= 1, the visual tokens to keep per image; T >= N keeps all N.
        important_ratio: r in [0, 1]; ``int(T * r)`` tokens are chosen by attention.

    Returns:
        A :class:`Selection` with ``keep`` and ``important``, both (B, N) bool on the features'
        device. Each row of ``keep`` has exactly ``min(T, N)`` True, including the
        ``min(int(T * r), N)`` highest-attention tokens, which are ``important``.

    The diverse tokens come from the rest, listed in descending attention: while more than
    ``T_div = min(T, N) - T_imp`` remain, split the list by position into A (even) and B (odd),
    score each token of A by its highest cosine similarity to B, drop the most similar tokens of
    A, and continue with the surviving A (most similar first) followed by B. Similarities are
    computed once, in float32, on L2-normalised features (zero vectors stay zero, so padding
    has similarity 0, never NaN), which gives the same masks as the authors' code wherever it
    runs.

    Where the authors' code crashes, this keeps their rule and stays total:
      * an odd list length: A (even positions) has one token more than B, as the split gives;
        a token of A with no B to compare with (a list of one) scores 0;
      * a step that would drop more than half: each step drops
        ``min(8, R - T_div, ceil(R / 2))`` tokens, never more than A holds, and the loop
        continues with smaller steps until ``T_div`` remain.
    Exact ties in attention or similarity are ordered by ``torch.argsort``, as in the authors'
    code, so that float ties (they occur: one golden case has one) resolve the same way.
    """
    features = check_features(features)
    batch, tokens, _ = features.shape
    scores = check_attention(attention, batch, tokens).to(features.device)
    num_tokens = check_num_tokens(num_tokens)
    important_ratio = check_ratio(important_ratio, "important_ratio")

    num_keep = min(num_tokens, tokens)
    num_important = min(int(num_tokens * important_ratio), tokens)
    num_diverse = num_keep - num_important

    order = torch.argsort(scores, dim=1, descending=True)
    important = order[:, :num_important]
    residual = order[:, num_important:]
    diverse = torch.cat(
        [
            _remove_duplicates(features[rows], residual[rows], num_diverse)
            for rows in _batch_chunks(features, residual.shape[1])
        ]
    )

    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    keep.scatter_(1, important, True)
    important_mask = keep.clone()
    keep.scatter_(1, diverse, True)
    return Selection(keep=keep, important=important_mask)


def select(
    features: torch.Tensor,
    attention: torch.Tensor,
    num_tokens: int,
    important_ratio: float = 0.5,
) -> torch.Tensor:
    """(B, N) bool keep mask of VisPruner; see :func:`vispruner_selection`."""
    return vispruner_selection(features, attention, num_tokens, important_ratio).keep


#: On CPU, images are processed in groups whose float32 working set (features and similarity)
#: stays near this size: it keeps the buffers cache-resident and reused by the allocator.
CPU_CHUNK_BYTES = 32 * 2**20


def _batch_chunks(features: torch.Tensor, length: int) -> list[slice]:
    batch, _, width = features.shape
    if features.device.type != "cpu":
        return [slice(0, batch)]
    per_image = 4 * length * (width + length)
    size = max(1, CPU_CHUNK_BYTES // max(per_image, 1))
    return [slice(start, start + size) for start in range(0, batch, size)]


def _remove_duplicates(features: torch.Tensor, residual: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices (B, budget) of the tokens of ``residual`` (B, R) that survive duplicate removal."""
    batch, length = residual.shape
    if length <= budget:
        return residual
    if budget == 0:
        # Nothing survives (FasterVLM, important_ratio=1): skip the similarity and the loop.
        return residual[:, :0]
    unit = _rows(features, residual).float()
    # In place: a fresh (B, R, C) buffer costs more in page faults than the division itself.
    unit.div_(torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min_(1e-12))
    # The float32 similarity among the residual tokens is computed once; the steps only read it.
    similarity = _self_similarity(unit)
    # ``members`` (B, L) are positions in ``residual`` that ``similarity`` (B, L, L) covers;
    # ``order`` lists positions in ``members`` in the published order.
    members = torch.arange(length, device=residual.device).expand(batch, length)
    order = members
    while order.shape[1] > budget:
        remaining, covered = order.shape[1], members.shape[1]
        if 2 * remaining <= covered:
            # Shrink the matrix to the tokens still listed, so that row copies stay short.
            similarity = _submatrix(similarity, order)
            members = torch.gather(members, 1, order)
            order = torch.arange(remaining, device=order.device).expand(batch, remaining)
            covered = remaining
        side_a, side_b = order[:, 0::2], order[:, 1::2]
        size_a, size_b = side_a.shape[1], side_b.shape[1]
        drop = min(STEP, remaining - budget, size_a)
        if size_b == 0:
            closeness = torch.zeros(side_a.shape, device=order.device)
        else:
            # Whole rows first (contiguous copies), then the B columns within them: far fewer
            # cache misses than gathering the (A, B) pairs from the matrix directly.
            rows = _rows(similarity, side_a)
            closeness = torch.gather(rows, 2, side_b.unsqueeze(1).expand(-1, size_a, -1)).amax(dim=2)
        survivors = torch.argsort(closeness, dim=1, descending=True)[:, drop:]
        order = torch.cat([torch.gather(side_a, 1, survivors), side_b], dim=1)
    return torch.gather(residual, 1, torch.gather(members, 1, order))


def _self_similarity(unit: torch.Tensor) -> torch.Tensor:
    """(B, L, L) = unit @ unit^T, computing the upper half of row blocks only (it is symmetric)."""
    batch, length, _ = unit.shape
    half = length // 2
    out = unit.new_empty(batch, length, length)
    top = torch.bmm(unit[:, :half], unit.transpose(1, 2))
    out[:, :half] = top
    out[:, half:, :half] = top[:, :, half:].transpose(1, 2)
    out[:, half:, half:] = torch.bmm(unit[:, half:], unit[:, half:].transpose(1, 2))
    return out


def _rows(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """matrix[b, index[b, i], :] for (B, L, D) ``matrix`` and (B, K) ``index``: (B, K, D)."""
    batch, length, width = matrix.shape
    offset = (torch.arange(batch, device=index.device) * length).unsqueeze(1)
    flat = matrix.reshape(batch * length, width).index_select(0, (index + offset).reshape(-1))
    return flat.view(batch, index.shape[1], width)


def _submatrix(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """matrix[b][index[b]][:, index[b]]: (B, K, K)."""
    rows = _rows(matrix, index)
    return torch.gather(rows, 2, index.unsqueeze(1).expand(-1, index.shape[1], -1))


def _from_signals(signals: VisionSignals, num_tokens: int, important_ratio: float = 0.5) -> Selection:
    attention = require_signal(signals, "attention", "vispruner")
    return vispruner_selection(signals.features, attention, num_tokens, important_ratio)


METHOD = register(
    Method(
        name="vispruner",
        select=_from_signals,
        paper="https://arxiv.org/abs/2412.01818",
        summary="[CLS]-attention important tokens plus diverse tokens by duplicate removal",
        needs=frozenset({"attention"}),
        options={"important_ratio": check_ratio},
    )
)
