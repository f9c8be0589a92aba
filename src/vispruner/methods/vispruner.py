"""VisPruner: important tokens by [CLS] attention, then diverse tokens by duplicate removal.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning
in VLMs", ICCV 2025, https://arxiv.org/abs/2412.01818
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from . import _graphs, _native, _triton
from ._checks import check_attention, check_features, check_num_tokens, check_ratio, require_signal
from ._threads import serial
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
    computed once (:func:`residual_similarity`: float32, L2-normalised features, zero vectors
    stay zero, so padding has similarity 0, never NaN), which gives the same masks as the
    authors' code wherever it runs. Each token's most similar tokens are listed once (again
    whenever the list halves), so a step finds each A token's highest similarity to B in a few
    probes, exactly: the whole selection costs about as much as the similarity, O(N^2 C), not
    O(N^3). On the CPU the step loop runs in one native call where a C++ compiler exists
    (:mod:`._native`; the same values and the same sort, so the same masks), else as tensor ops.
    On a GPU the steps read each A token's highest similarity to B as a masked row maximum (the
    same element; no host reads); where Triton is, one kernel launch runs every step of every
    image, ordering ties as CUDA's sort does (:mod:`._triton`); and the whole selection replays
    from a CUDA graph (:mod:`._graphs`).

    Where the authors' code crashes, this keeps their rule and stays total:
      * an odd list length: A (even positions) has one token more than B, as the split gives;
        a token of A with no B to compare with (a list of one) scores 0;
      * a step that would drop more than half: each step drops
        ``min(8, R - T_div, ceil(R / 2))`` tokens, never more than A holds, and the loop
        continues with smaller steps until ``T_div`` remain.
    Ties: the importance ranking is ``torch.argsort(scores, dim=1, descending=True)`` of the
    head-averaged float32 scores and each step ranks A by ``torch.argsort(closeness, dim=1,
    descending=True)``, both with torch's default, *unstable* sort, as in the authors' code.
    Tied scores (common: bfloat16 attention has a few hundred distinct values among 576) are
    therefore ordered as that sort orders them, not by position; ``stable=True`` would pick a
    different important set and residual order, and the golden masks (one case has a float
    tie) would no longer all match.
    """
    features = check_features(features)
    batch, tokens, _ = features.shape
    scores = check_attention(attention, batch, tokens).to(features.device)
    num_tokens = check_num_tokens(num_tokens)
    important_ratio = check_ratio(important_ratio, "important_ratio")

    num_keep = min(num_tokens, tokens)
    num_important = min(int(num_tokens * important_ratio), tokens)
    num_diverse = num_keep - num_important
    # On a GPU: one CUDA graph launch per call (see _graphs); elsewhere, the same code eagerly.
    keep, important = _graphs.run(_select, (features, scores), num_important, num_diverse)
    return Selection(keep=keep, important=important)


def _select(
    features: torch.Tensor, scores: torch.Tensor, num_important: int, num_diverse: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, important) masks (B, N) of checked inputs: no host reads of device values."""
    batch, tokens, _ = features.shape
    order = torch.argsort(scores, dim=1, descending=True)
    important = order[:, :num_important]
    residual = order[:, num_important:]
    parts = [
        _remove_duplicates(features[rows], residual[rows], num_diverse)
        for rows in _batch_chunks(features, residual.shape[1])
    ]
    diverse = parts[0] if len(parts) == 1 else torch.cat(parts)

    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    keep.scatter_(1, important, True)
    important_mask = keep.clone()
    keep.scatter_(1, diverse, True)
    return keep, important_mask


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
    length = residual.shape[1]
    if length <= budget:
        return residual
    if budget == 0:
        # Nothing survives (FasterVLM, important_ratio=1): skip the similarity and the loop.
        return residual[:, :0]
    if features.device.type != "cpu":
        similarity = residual_similarity(features, residual)
        if _triton.usable(similarity, length, _triton.MAX_RESIDUAL):
            # The whole loop in one kernel launch: the same steps on the same similarity.
            survivors = _triton.remove_duplicates(similarity, budget, _step_count(length, budget), STEP)
            if survivors is not None:
                return torch.gather(residual, 1, survivors)
        return _remove_duplicates_dense(similarity, residual, budget)
    native = _native.library()
    if native is not None:
        # The whole loop in one call, on the same similarity and partner lists: the same tokens.
        positions = _native.remove_duplicates(native, residual_similarity(features, residual), budget)
        return torch.gather(residual, 1, positions)
    partners = _Partners(residual_similarity(features, residual))
    # ``members`` (B, L): the tokens of ``residual`` that ``partners`` covers; ``order`` lists
    # them (by ``partners``' flat numbering) in the published order.
    members = residual
    order = partners.listed()
    while order.shape[1] > budget:
        if 2 * order.shape[1] <= partners.length:
            # Restrict to the tokens still listed, so that a token's partners are mostly listed.
            members = torch.gather(members, 1, partners.positions(order))
            partners = partners.restricted(order)
            order = partners.listed()
        # A step is a dozen small ops: on one thread (see _threads).
        with serial(order.device):
            while order.shape[1] > budget and 2 * order.shape[1] > partners.length:
                order = _step(partners.closest, order, budget)
    return torch.gather(members, 1, partners.positions(order))


def _remove_duplicates_dense(similarity: torch.Tensor, residual: torch.Tensor, budget: int) -> torch.Tensor:
    """:func:`_remove_duplicates` for GPUs, given ``residual``'s :func:`residual_similarity`: the
    same steps, each A token's highest similarity to B read as a masked maximum over its row, the
    same element of the same similarity. Its shapes follow from (R, budget) alone and it reads
    nothing back to the host (the partner lists need ``nonzero``), so a CUDA graph can capture
    it; a GPU reads the rows faster than it syncs."""
    members = residual
    order = _listed(similarity)
    while order.shape[1] > budget:
        if 2 * order.shape[1] <= similarity.shape[1]:
            # Restrict to the tokens still listed, as the partner lists do: smaller rows.
            members = torch.gather(members, 1, order)
            similarity = _submatrix(similarity, order)
            order = _listed(similarity)
        order = _step(functools.partial(_closest_in_rows, similarity), order, budget)
    return torch.gather(members, 1, order)


def _listed(similarity: torch.Tensor) -> torch.Tensor:
    """(B, L) every row of the (B, L, L) ``similarity``, in order."""
    batch, length, _ = similarity.shape
    return torch.arange(length, device=similarity.device).expand(batch, length)


def _closest_in_rows(similarity: torch.Tensor, side_a: torch.Tensor, side_b: torch.Tensor) -> torch.Tensor:
    """(B, |A|) highest similarity of each row ``side_a`` (B, |A|) to the columns ``side_b``."""
    batch, length, _ = similarity.shape
    outside_b = torch.full((batch, length), -math.inf, device=similarity.device).scatter_(1, side_b, 0.0)
    return (_rows(similarity, side_a) + outside_b.unsqueeze(1)).amax(dim=2)


def _step(
    closest: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], order: torch.Tensor, budget: int
) -> torch.Tensor:
    """One step of duplicate removal on the list ``order`` (B, R): the next list. ``closest``
    gives each token of A its highest similarity to B."""
    side_a, side_b = order[:, 0::2], order[:, 1::2]
    drop = _dropped(order.shape[1], budget)
    if side_b.shape[1] == 0:
        closeness = torch.zeros(side_a.shape, device=order.device)
    else:
        closeness = closest(side_a, side_b)
    survivors = torch.argsort(closeness, dim=1, descending=True)[:, drop:]
    return torch.cat([torch.gather(side_a, 1, survivors), side_b], dim=1)


def _dropped(length: int, budget: int) -> int:
    """Tokens a step drops from a list of ``length`` (A holds ``ceil(length / 2)`` of them)."""
    return min(STEP, length - budget, (length + 1) // 2)


def _step_count(length: int, budget: int) -> int:
    """Steps duplicate removal takes from ``length`` tokens to ``budget``."""
    steps = 0
    while length > budget:
        length -= _dropped(length, budget)
        steps += 1
    return steps


@torch.no_grad()
def residual_similarity(features: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The similarity VisPruner's duplicate removal reads: (B, R, R) float32 cosine similarity
    among the tokens ``residual`` (B, R) of ``features`` (B, N, C), in that order.

    It is computed once, on L2-normalised float32 features (zero vectors stay zero), by one
    fixed sequence of matrix products. Matrix products of other shapes may round the last bit
    differently, so whatever must see the same values calls this function.
    """
    # Small inputs on one thread (see _threads). The norm qualifies: with two or more rows,
    # torch reduces each row on one thread, whatever the thread count (checked bit for bit).
    # The products run at the caller's thread count, as they always have.
    with serial(features.device, residual.numel() * features.shape[2]):
        unit = _rows(features, residual).float()
        # In place: a fresh (B, R, C) buffer costs more in page faults than the division itself.
        unit.div_(torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min_(1e-12))
    # Symmetric: the upper half of row blocks is computed and its cross block mirrored, written
    # straight into the result so that no second (B, R, R) buffer exists.
    batch, length, _ = unit.shape
    half = length // 2
    out = unit.new_empty(batch, length, length)
    torch.bmm(unit[:, :half], unit.transpose(1, 2), out=out[:, :half])
    # Tile by tile: a transposed copy of the whole block reads memory with a stride of a row
    # and ran 4x slower (N = 8192); tiles of 1024 beat 256 and 512, most of all on a busy CPU,
    # where each parallel copy waits for its slowest thread.
    with serial(out.device, batch * half * (length - half)):
        for row in range(0, half, MIRROR_TILE):
            rows = slice(row, min(row + MIRROR_TILE, half))
            for column in range(half, length, MIRROR_TILE):
                columns = slice(column, column + MIRROR_TILE)
                out[:, columns, rows].copy_(out[:, rows, columns].transpose(1, 2))
    torch.bmm(unit[:, half:], unit[:, half:].transpose(1, 2), out=out[:, half:, half:])
    return out


#: Side of the square tiles in which :func:`residual_similarity` mirrors its cross block.
MIRROR_TILE = 1024


#: Most similar tokens listed per token, in descending similarity.
PARTNERS = 16
#: Partners every token of A probes; only tokens with none of them in B read further.
FIRST_PROBES = 8


class _Partners:
    """Each token's most similar tokens, so that a step finds each A token's closest B token
    in a few probes instead of a row of the similarity.

    A token's highest similarity to B is that of the first of its partners (in descending
    similarity) that is in B: a token beyond the list is no more similar than the list's last.
    A token with no partner in B takes the maximum over its row's B columns instead. Either way
    the value is an element of the similarity matrix, so it equals the maximum over B exactly.
    Tokens are numbered flat, ``b * L + i`` for token ``i`` of image ``b``.
    """

    def __init__(self, similarity: torch.Tensor) -> None:
        batch, length, _ = similarity.shape
        # A token is never on both sides, so it is never its own partner.
        similarity.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        count = min(PARTNERS, length)
        values, index = torch.topk(similarity, count, dim=2)
        self.offset = (torch.arange(batch, device=similarity.device) * length).unsqueeze(1)
        values = values.view(batch * length, count)
        index = (index + self.offset.unsqueeze(2)).view(batch * length, count)
        split = min(FIRST_PROBES, count)
        self.head = values[:, :split].contiguous(), index[:, :split].contiguous()
        self.tail = values[:, split:], index[:, split:]
        self.similarity = similarity
        # 0 for the tokens of B, -inf for the rest: added to a similarity, it leaves B's alone.
        self.penalty = torch.empty(batch * length, device=similarity.device)
        self.length = length

    def listed(self) -> torch.Tensor:
        """(B, L) every token, in matrix order."""
        return torch.arange(self.length, device=self.offset.device) + self.offset

    def positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Matrix rows (B, K) of ``tokens`` (B, K)."""
        return tokens - self.offset

    def restricted(self, tokens: torch.Tensor) -> _Partners:
        """The partners among ``tokens`` (B, K) only, numbered in that order."""
        return _Partners(_submatrix(self.similarity, self.positions(tokens)))

    def closest(self, side_a: torch.Tensor, side_b: torch.Tensor) -> torch.Tensor:
        """(B, |A|) highest similarity of each token of ``side_a`` to any token of ``side_b``."""
        penalty = self.penalty.fill_(-math.inf).index_fill_(0, side_b.reshape(-1), 0.0)
        tokens = side_a.reshape(-1)
        closeness = _probe(self.head, tokens, penalty)
        pending = (closeness == -math.inf).nonzero().squeeze(1)
        if pending.numel():
            tokens = tokens[pending]
            found = _probe(self.tail, tokens, penalty)
            unresolved = (found == -math.inf).nonzero().squeeze(1)
            if unresolved.numel():
                # The rest read their rows of the similarity at the columns of B only.
                tokens = tokens[unresolved]
                columns = self.positions(side_b).index_select(0, tokens // self.length)
                cells = tokens.unsqueeze(1) * self.length + columns
                found[unresolved] = self.similarity.view(-1).take(cells).amax(dim=1)
            closeness[pending] = found
        return closeness.view(side_a.shape)


def _probe(table: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """(K,) highest similarity of each of ``tokens`` (K,) to its partners in ``table`` that are
    in B (-inf where none is; ``penalty`` says which tokens are): the first such partner's, as
    the lists descend."""
    values, index = table
    return values.index_select(0, tokens).add_(penalty.take(index.index_select(0, tokens))).amax(dim=1)


def _rows(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """matrix[b, index[b, i], :] for (B, L, D) ``matrix`` and (B, K) ``index``: (B, K, D)."""
    batch, length, width = matrix.shape
    offset = (torch.arange(batch, device=index.device) * length).unsqueeze(1)
    flat = matrix.reshape(batch * length, width).index_select(0, (index + offset).reshape(-1))
    return flat.view(batch, index.shape[1], width)


#: Elements of the whole rows that :func:`_submatrix` copies at a time (64 MiB of float32).
SUBMATRIX_BLOCK = 2**24


def _submatrix(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """matrix[b][index[b]][:, index[b]]: (B, K, K)."""
    batch, length, _ = matrix.shape
    count = index.shape[1]
    out = matrix.new_empty(batch, count, count)
    # Whole rows first (contiguous copies), then the columns within them, a block of rows at a
    # time: the rows of all K tokens at once would cost half the matrix again in memory.
    block = max(1, SUBMATRIX_BLOCK // (batch * length))
    columns = index.unsqueeze(1)
    for start in range(0, count, block):
        rows = _rows(matrix, index[:, start : start + block])
        out[:, start : start + block] = torch.gather(rows, 2, columns.expand(-1, rows.shape[1], -1))
    return out


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
