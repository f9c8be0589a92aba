"""The Triton kernels run by Triton's interpreter on the CPU (``TRITON_INTERPRET=1``, set before
Triton is imported, so in a process of its own: ``test_triton.py`` starts it). Exits non-zero on
the first case whose result differs from the independent step-by-step loop."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

root = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(root / "src"), str(root)]  # as pytest's pythonpath: this checkout's code
from tests.methods import cuda_order  # noqa: E402
from vispruner.methods import _native, _triton, vispruner  # noqa: E402
from vispruner.methods.divprune import _greedy_max_min  # noqa: E402


def tied_similarity(batch: int, length: int, levels: int, generator: torch.Generator) -> torch.Tensor:
    """(B, R, R) symmetric similarities from ``levels`` values only: ties everywhere."""
    grid = torch.randint(0, levels, (batch, length, length), generator=generator).float() / levels
    return grid + grid.transpose(1, 2)


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    # Lists that stay above 32 (stable order), go below it (bitonic network), odd lengths, a
    # budget of 1, and B = 2 (one program per image).
    cases = [(1, 20, 5), (2, 40, 10), (1, 70, 12), (2, 33, 1), (1, 129, 30), (2, 100, 31), (1, 64, 32), (1, 9, 8)]
    for batch, length, budget in cases:
        for levels in (2, 5, 1_000_000):
            similarity = tied_similarity(batch, length, levels, generator)
            steps = vispruner._step_count(length, budget)
            got = _triton.remove_duplicates(similarity, budget, steps, vispruner.STEP).tolist()
            want = [cuda_order.remove_duplicates(similarity[b], budget) for b in range(batch)]
            assert got == want, (batch, length, budget, levels, got, want)
    # DivPrune: the kernel against the eager loop (torch's argmin: first index among ties).
    for tokens, count, width in [(2, 1, 3), (50, 7, 4), (300, 40, 2), (64, 64, 8)]:
        features = torch.randint(-2, 3, (2, tokens, width), generator=generator).float()
        _native.library = lambda: None  # the eager loop below, not the native one
        (expected,) = _greedy_max_min(features, count)
        unit = torch.nn.functional.normalize(features, dim=-1)
        similarity = torch.bmm(unit, unit.transpose(1, 2))
        similarity.diagonal(dim1=1, dim2=2).fill_(-torch.inf)
        first = similarity.amax(dim=2).argmin(dim=1)
        got = _triton.greedy_max_min(similarity, first, count)
        assert torch.equal(got, expected), (tokens, count)
    print("interpreted kernels match")


if __name__ == "__main__":
    main()
