"""Argument checks shared by the methods: every error names the argument and the allowed range."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ._threads import serial


def check_finite(tensor: torch.Tensor, name: str) -> None:
    # min and max propagate NaN and expose +-inf; two reductions cost less than isfinite().all(),
    # which materialises a mask as large as the input. The two are tested as Python floats:
    # isfinite on tensors is four ops each, and each op is a kernel launch off the CPU.
    with serial(tensor.device, tensor.numel()):
        low, high = torch.aminmax(tensor)
    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
        raise ValueError(f"{name} must be finite; it contains NaN or infinite values")


def check_integer(value: object, name: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int if it is an integer in [low, high] (no upper bound when ``high`` is None)."""
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer {allowed}; got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {allowed}; got {value}")
    return int(value)


def check_num_tokens(num_tokens: object, name: str = "num_tokens") -> int:
    return check_integer(num_tokens, name)


def check_ratio(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1]; got {value}")
    return value


def check_features(features: object, name: str = "features") -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, N, C); got {type(features).__name__}")
    if features.ndim != 3:
        raise ValueError(f"{name} must have shape (B, N, C) (rank 3); got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {features.dtype}")
    if features.shape[0] < 1 or features.shape[1] < 1 or features.shape[2] < 1:
        raise ValueError(f"{name} must have B >= 1, N >= 1 and C >= 1; got shape {tuple(features.shape)}")
    check_finite(features, name)
    return features


def check_patch_tensor(
    value: object, name: str, shapes: tuple[str, str], batch: int, tokens: int, patch_axis: int
) -> torch.Tensor:
    """Validate a float tensor of one of two ``shapes`` (ranks r and r + 1), with ``batch`` rows
    and N = ``tokens`` patches along ``patch_axis``, every dimension non-empty and all finite."""
    allowed = " or ".join(shapes)
    rank = shapes[0].count(",") + 1
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {allowed}; got {type(value).__name__}")
    if value.ndim not in (rank, rank + 1):
        raise ValueError(f"{name} must have shape {allowed} (rank {rank} or {rank + 1}); got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    if value.shape[0] != batch:
        raise ValueError(f"{name} batch size must equal the features' batch size {batch}; got {value.shape[0]}")
    axis = "last dimension" if patch_axis == -1 else "second dimension"
    if value.shape[patch_axis] != tokens:
        raise ValueError(f"{name} {axis} must equal the number of patches N={tokens}; got {value.shape[patch_axis]}")
    if value.numel() == 0:
        raise ValueError(f"{name} must have no empty dimension; got shape {tuple(value.shape)}")
    check_finite(value, name)
    return value


def check_attention(attention: object, batch: int, tokens: int, name: str = "attention") -> torch.Tensor:
    """Validate (B, N) scores or (B, H, N) per-head attention; return (B, N) float32 scores."""
    scores = check_patch_tensor(attention, name, ("(B, N)", "(B, H, N)"), batch, tokens, -1).float()
    return scores.mean(dim=1) if scores.ndim == 3 else scores


_SIGNALS = {
    "attention": "the [CLS] attention",
    "keys": "the vision layer's attention keys",
    "grid": "the patch grid (rows, cols)",
    "projected": "the projected visual tokens",
    "text": "the instruction's text embeddings",
    "joint": "the patches' embeddings in CLIP's joint space (the clip option)",
}


def require_signal(signals: object, signal: str, method: str) -> Any:
    """``signals.<signal>``, or a ValueError saying that ``method`` cannot run without it."""
    value = getattr(signals, signal)
    if value is None:
        raise ValueError(f"method {method!r} needs {_SIGNALS[signal]}, which this model does not provide")
    return value
