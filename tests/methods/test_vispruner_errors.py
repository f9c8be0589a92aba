"""Every bad input raises ValueError naming the argument and the allowed range."""

from __future__ import annotations

import math

import pytest
import torch

import vispruner

F = torch.randn(2, 10, 4)
A = torch.rand(2, 10)


@pytest.mark.parametrize("num_tokens", [0, -3, 2.5, "4", None, True])
def test_num_tokens(num_tokens):
    with pytest.raises(ValueError, match=r"num_tokens must be an integer >= 1"):
        vispruner.select(F, A, num_tokens)


@pytest.mark.parametrize("ratio", [-0.1, 1.01, math.nan, math.inf, "0.5", None])
def test_important_ratio(ratio):
    with pytest.raises(ValueError, match=r"important_ratio must be a number in \[0, 1\]"):
        vispruner.select(F, A, 4, ratio)


@pytest.mark.parametrize(
    "features,attention,message",
    [
        (torch.randn(10, 4), A, r"features must have shape \(B, N, C\)"),
        (torch.randn(1, 2, 10, 4), A, r"features must have shape \(B, N, C\)"),
        (torch.ones(2, 10, 4, dtype=torch.long), A, r"features must be a floating-point"),
        (torch.randn(2, 0, 4), torch.rand(2, 0), r"features must have B >= 1, N >= 1"),
        ([[1.0]], A, r"features must be a torch.Tensor"),
        (F, torch.rand(10), r"attention must have shape \(B, N\) or \(B, H, N\)"),
        (F, torch.rand(2, 1, 1, 10), r"attention must have shape"),
        (F, torch.rand(3, 10), r"attention batch size must equal the features' batch size 2"),
        (F, torch.rand(2, 11), r"attention last dimension must equal the number of patches N=10"),
        (F, torch.rand(2, 0, 10), r"attention must have no empty dimension"),
        (F, torch.ones(2, 10, dtype=torch.long), r"attention must be a floating-point"),
        (F, None, r"attention must be a torch.Tensor"),
    ],
)
def test_shapes(features, attention, message):
    with pytest.raises(ValueError, match=message):
        vispruner.select(features, attention, 4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["features", "attention"])
def test_non_finite_values(bad, where):
    features, attention = F.clone(), A.clone()
    (features if where == "features" else attention).view(-1)[7] = bad
    with pytest.raises(ValueError, match=rf"{where} must be finite"):
        vispruner.select(features, attention, 4)
