"""VisionZip: "dominant" patches by [CLS] attention plus "contextual" tokens merged from the rest.

Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025,
https://arxiv.org/abs/2412.04467
"""

from __future__ import annotations

import torch

from ._checks import check_attention, check_features, check_num_tokens, check_patch_tensor, check_ratio, require_signal
from .base import Method, Selection, VisionSignals, register

#: Share of the budget given to contextual tokens: the published 10 of 64 (54 dominant + 10
#: contextual), which is also the split of the paper's 128 (108 + 20) and 192 (162 + 30) settings.
CONTEXTUAL_RATIO = 10 / 64


def visionzip_selection(
    features: torch.Tensor,
    attention: torch.Tensor,
    keys: torch.Tensor,
    num_tokens: int,
    contextual_ratio: float = CONTEXTUAL_RATIO,
) -> Selection:
    """Choose ``min(num_tokens, N)`` tokens per image the way VisionZip does.

    Args:
        features: (B, N, C) patch features of the layer that feeds the projector ([CLS] removed).
        attention: (B, N) [CLS]-to-patch scores, or (B, H, N) per-head [CLS] attention, which is
            averaged over heads.
        keys: (B, N, H, d) per-head attention keys of that layer (the key projection's output
            before scaling), averaged over heads as the authors do, or (B, N, D) keys used as
            they are.
        num_tokens: T >= 1 visual tokens to keep per image; T >= N keeps all N unchanged.
        contextual_ratio: in [0, 1]; of the ``K = min(T, N)`` kept tokens,
            ``int(K * contextual_ratio)`` are contextual and the rest dominant. The default
            gives the published splits exactly: 54 + 10 at 64 tokens, 108 + 20 at 128, 162 + 30
            at 192.

    Returns:
        A :class:`Selection`: ``keep`` (B, N) bool with exactly K True per row; ``important``
        (B, N) bool, the dominant tokens; ``features`` (B, N, C) in the input dtype, equal to
        ``features`` except at the contextual tokens, which hold their merged features (None
        when there is no contextual token).

    Dominant: the ``K - K_ctx`` patches with the highest attention (of tied scores, the lower
    index first). Contextual: the other ``R = N - K_dom`` patches, in raster order, give
    ``K_ctx`` targets evenly spaced by ``R // K_ctx`` from the first; every other remaining patch joins the target whose
    L2-normalised key is most similar (cosine; the first target wins a tie). A target's merged
    feature is its own feature plus the mean feature of the patches that joined it, as the
    authors' code computes it (a target nobody joins keeps its own feature). Each contextual
    token sits at its target's position, so kept tokens stay in raster order. Similarities and
    sums are computed in float32; zero keys have similarity 0, never NaN.
    """
    features = check_features(features)
    batch, tokens, channels = features.shape
    scores = check_attention(attention, batch, tokens).to(features.device)
    metric = _check_keys(keys, batch, tokens).to(features.device)
    num_tokens = check_num_tokens(num_tokens)
    contextual_ratio = check_ratio(contextual_ratio, "contextual_ratio")

    num_keep = min(num_tokens, tokens)
    num_contextual = int(num_keep * contextual_ratio)
    num_dominant = num_keep - num_contextual

    dominant = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    # Stable: tied scores (common with half-precision attention) go to the lower index on every
    # device, where topk's choice among ties depends on the kernel.
    ranked = torch.argsort(scores, dim=1, descending=True, stable=True)
    dominant.scatter_(1, ranked[:, :num_dominant], True)
    if num_contextual == 0:
        return Selection(keep=dominant.clone(), important=dominant)

    # nonzero() lists each row's remaining patches in raster order.
    rest = (~dominant).nonzero()[:, 1].view(batch, tokens - num_dominant)
    spacing = rest.shape[1] // num_contextual  # >= 1: at least K_ctx patches remain
    is_target = torch.zeros(rest.shape[1], dtype=torch.bool, device=features.device)
    is_target[: spacing * num_contextual : spacing] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]

    unit = torch.nn.functional.normalize(metric, dim=-1)
    similarity = torch.bmm(_rows(unit, others), _rows(unit, targets).transpose(1, 2))
    joins = similarity.argmax(dim=2)  # (B, R - K_ctx): which target each other patch joins
    sums = torch.zeros(batch, num_contextual, channels, device=features.device)
    sums.scatter_add_(1, joins.unsqueeze(2).expand(-1, -1, channels), _rows(features, others).float())
    counts = torch.zeros(batch, num_contextual, device=features.device)
    counts.scatter_add_(1, joins, torch.ones_like(joins, dtype=counts.dtype))
    merged = _rows(features, targets).float() + sums / counts.clamp_min(1).unsqueeze(2)

    out = features.clone()
    out.scatter_(1, targets.unsqueeze(2).expand(-1, -1, channels), merged.to(features.dtype))
    keep = dominant.clone()
    keep.scatter_(1, targets, True)
    return Selection(keep=keep, important=dominant, features=out)


def _rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values[b, index[b]] for (B, N, C) ``values`` and (B, K) ``index``: (B, K, C)."""
    return torch.gather(values, 1, index.unsqueeze(2).expand(-1, -1, values.shape[2]))


def _check_keys(keys: object, batch: int, tokens: int) -> torch.Tensor:
    """Validate (B, N, D) or (B, N, H, d) keys; return (B, N, D) float32 (heads averaged)."""
    metric = check_patch_tensor(keys, "keys", ("(B, N, D)", "(B, N, H, d)"), batch, tokens, 1).float()
    return metric.mean(dim=2) if metric.ndim == 4 else metric


def _from_signals(signals: VisionSignals, num_tokens: int, contextual_ratio: float = CONTEXTUAL_RATIO) -> Selection:
    attention = require_signal(signals, "attention", "visionzip")
    keys = require_signal(signals, "keys", "visionzip")
    return visionzip_selection(signals.features, attention, keys, num_tokens, contextual_ratio)


METHOD = register(
    Method(
        name="visionzip",
        select=_from_signals,
        paper="https://arxiv.org/abs/2412.04467",
        summary="[CLS]-attention dominant tokens plus contextual tokens merged by key similarity",
        needs=frozenset({"attention", "keys"}),
        options={"contextual_ratio": check_ratio},
    )
)
