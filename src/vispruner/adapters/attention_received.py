"""The attention each token receives in a self-attention layer, without holding the attention matrix.

Vision towers without a [CLS] token (Qwen-VL, SigLIP) have no row that summarises the image; the
usual stand-in is the attention each patch receives from the other patches of its image,
averaged over heads and over those queries. Images reach 16k patches, so the (heads x S x S)
matrix is never formed: queries are taken a chunk at a time and only the column sums are kept.
"""

from __future__ import annotations

import torch

#: Default bound on the float32 attention probabilities held at once.
CHUNK_BYTES = 32 * 2**20


def mean_attention_received(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    segments: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Softmax attention received by each key, averaged over heads and over its segment's queries.

    Args:
        query, key: (H, S, d) per-head queries and keys of one concatenated sequence (after any
            rotary embedding), as the layer computes them.
        scale: the factor applied to ``query @ key^T`` before the softmax (usually ``d ** -0.5``).
        segments: optional 1D integer tensor of cumulative boundaries ``[0, s1, s1 + s2, ..., S]``
            (like ``cu_seqlens``): a query attends only to the keys of its own segment. None: one
            segment of all S positions.
        chunk_bytes: at most about this many bytes of float32 attention exist at once; queries
            are processed in chunks of ``chunk_bytes // (4 * H * segment length)`` (at least 1).

    Returns:
        (S,) float32: for key position j of segment [a, b), the mean over heads h and queries
        i in [a, b) of ``softmax_j(scale * q_hi . k_h)``. Each segment's values sum to 1.
    """
    if query.ndim != 3 or key.shape != query.shape:
        raise ValueError(
            f"query and key must both have shape (H, S, d); got {tuple(query.shape)} and {tuple(key.shape)}"
        )
    heads, length, _ = query.shape
    if segments is None:
        bounds = [0, length]
    else:
        bounds = [int(b) for b in segments.tolist()]
        if bounds[0] != 0 or bounds[-1] != length or any(b > c for b, c in zip(bounds, bounds[1:])):
            raise ValueError(f"segments must rise from 0 to S={length}; got {bounds}")
    received = torch.zeros(length, dtype=torch.float32, device=query.device)
    for start, end in zip(bounds, bounds[1:]):
        size = end - start
        if size == 0:
            continue
        keys = key[:, start:end].float().transpose(1, 2)
        step = max(1, chunk_bytes // (4 * heads * size))
        total = received[start:end]
        for first in range(start, end, step):
            rows = query[:, first : min(first + step, end)].float()
            probabilities = torch.matmul(rows, keys).mul_(scale).softmax(dim=-1)
            total += probabilities.sum(dim=(0, 1))
        total /= heads * size
    return received
