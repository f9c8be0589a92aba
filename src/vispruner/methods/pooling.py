"""Spatial average pooling: the patch grid averaged down to the budget, one token per cell.

A spatially uniform baseline that independent benchmarks found strong, e.g. Wen et al., "Token
Pruning in Multimodal Large Language Models: Are We Solving the Right Problem?",
https://arxiv.org/abs/2502.11501
"""

from __future__ import annotations

import math
import numbers

import torch

from ._checks import check_features, check_num_tokens, require_signal
from .base import Method, Selection, VisionSignals, register


def pooling_cells(rows: int, cols: int, num_cells: int) -> list[tuple[int, int, int, int]]:
    """Split a rows x cols grid into exactly ``num_cells`` rectangles, 1 <= num_cells <= rows * cols.

    Returns (row_start, row_end, col_start, col_end) per cell (ends exclusive), in raster order.

    The grid is cut into ``bands`` horizontal bands of (near) equal height, and each band into
    cells of (near) equal width, so that cells are as close to square as the count allows:
    ``bands = round(sqrt(num_cells * rows / cols))``, clamped so that no band needs more cells
    than ``cols`` and no band is empty. The ``num_cells % bands`` bands that take one cell
    more than the others are spread evenly over the height. Boundaries are ``floor(i * L / n)``
    for n parts of a length L. When ``num_cells`` is a square that divides a square grid
    (64 cells on 24 x 24), this is ordinary s x s average pooling (3 x 3).
    """
    bands = round(math.sqrt(num_cells * rows / cols))
    bands = min(max(bands, -(-num_cells // cols), 1), rows, num_cells)
    base, extra = divmod(num_cells, bands)
    cells = []
    for band in range(bands):
        across = base + (band + 1) * extra // bands - band * extra // bands
        top, bottom = band * rows // bands, (band + 1) * rows // bands
        cells += [(top, bottom, j * cols // across, (j + 1) * cols // across) for j in range(across)]
    return cells


def pooling_selection(features: torch.Tensor, grid: tuple[int, int], num_tokens: int) -> Selection:
    """Average ``features`` over ``min(num_tokens, N)`` grid cells, one kept token per cell.

    Args:
        features: (B, N, C) patch features in raster order of the grid.
        grid: (rows, cols) with rows * cols == N.
        num_tokens: T >= 1 visual tokens to keep per image; T >= N keeps all N unchanged.

    Returns:
        A :class:`Selection`: ``keep`` (B, N) bool with exactly ``min(T, N)`` True per row, the
        same for every image, and ``features`` (B, N, C) in the input dtype holding each cell's
        mean feature (computed in float32) at its kept position, the cell's centre patch (the
        upper-left of the centre four when a side is even). Kept positions are in raster order
        of the cells (see :func:`pooling_cells`), so the language model sees the pooled grid
        row by row.
    """
    features = check_features(features)
    batch, tokens, channels = features.shape
    rows, cols = _check_grid(grid, tokens)
    num_keep = min(check_num_tokens(num_tokens), tokens)
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=features.device)
    if num_keep == tokens:
        return Selection(keep=keep.fill_(True))

    cells = pooling_cells(rows, cols, num_keep)
    # Each patch belongs to exactly one cell: pooling is a scatter-mean by cell id.
    cell_of = torch.empty(rows, cols, dtype=torch.long)
    centres = []
    for index, (top, bottom, left, right) in enumerate(cells):
        cell_of[top:bottom, left:right] = index
        centres.append((top + bottom - 1) // 2 * cols + (left + right - 1) // 2)
    cell_of = cell_of.view(-1).to(features.device)
    sizes = torch.bincount(cell_of, minlength=num_keep).to(torch.float32)
    sums = torch.zeros(batch, num_keep, channels, device=features.device)
    sums.index_add_(1, cell_of, features.float())
    centre = torch.tensor(centres, device=features.device)
    out = features.clone()
    out[:, centre] = (sums / sizes.unsqueeze(1)).to(features.dtype)
    keep[:, centre] = True
    return Selection(keep=keep, features=out)


def _check_grid(grid: object, tokens: int) -> tuple[int, int]:
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(side, numbers.Integral) and not isinstance(side, bool) and side >= 1 for side in grid)
    ):
        raise ValueError(f"grid must be a pair (rows, cols) of integers >= 1; got {grid!r}")
    rows, cols = int(grid[0]), int(grid[1])
    if rows * cols != tokens:
        raise ValueError(f"grid rows * cols must equal the number of patches N={tokens}; got {rows} x {cols}")
    return rows, cols


def _from_signals(signals: VisionSignals, num_tokens: int) -> Selection:
    return pooling_selection(signals.features, require_signal(signals, "grid", "pooling"), num_tokens)


METHOD = register(
    Method(
        name="pooling",
        select=_from_signals,
        paper="https://arxiv.org/abs/2502.11501",
        summary="spatial average pooling of the patch grid down to the budget (baseline)",
        needs=frozenset({"grid"}),
    )
)
