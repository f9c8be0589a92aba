"""Spatial pooling against torch's avg_pool2d where the grid divides evenly, and against
plain-loop cell means on every grid and budget."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vispruner.methods import VisionSignals, get_method
from vispruner.methods.pooling import pooling_cells, pooling_selection

from .strategies import problems


@pytest.mark.parametrize("side,pooled", [(24, 8), (24, 12), (24, 6), (6, 3), (8, 4)])
def test_square_budgets_equal_avg_pool2d(side, pooled):
    features = torch.randn(2, side * side, 5)
    selection = pooling_selection(features, (side, side), pooled * pooled)
    image = features.transpose(1, 2).reshape(2, 5, side, side)
    expected = torch.nn.functional.avg_pool2d(image, side // pooled).flatten(2).transpose(1, 2)
    torch.testing.assert_close(selection.features[selection.keep].view(2, -1, 5), expected)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_cells_tile_the_grid_in_raster_order_with_balanced_sides(rows, cols, data):
    num_cells = data.draw(st.integers(1, rows * cols))
    cells = pooling_cells(rows, cols, num_cells)
    assert len(cells) == num_cells
    owner = [[None] * cols for _ in range(rows)]
    for index, (top, bottom, left, right) in enumerate(cells):
        assert 0 <= top < bottom <= rows and 0 <= left < right <= cols
        for r in range(top, bottom):
            for c in range(left, right):
                assert owner[r][c] is None
                owner[r][c] = index
    assert all(cell is not None for line in owner for cell in line)
    assert cells == sorted(cells)  # raster order: by band, then left to right
    heights = {bottom - top for top, bottom, _, _ in cells}
    assert max(heights) - min(heights) <= 1
    for band in {(top, bottom) for top, bottom, _, _ in cells}:
        widths = {right - left for top, bottom, left, right in cells if (top, bottom) == band}
        assert max(widths) - min(widths) <= 1


@pytest.mark.parametrize(
    "rows,cols,num_cells,expected",
    [
        # A LLaVA-NeXT image of three crops stacked (budget="per_image"): 5 bands, not 2 of 12 x 2.
        (24, 8, 8, [(0, 4, 0, 8), (4, 9, 0, 4), (4, 9, 4, 8), (9, 14, 0, 8),
                    (14, 19, 0, 4), (14, 19, 4, 8), (19, 24, 0, 4), (19, 24, 4, 8)]),
        (8, 24, 8, [(0, 4, 0, 6), (0, 4, 6, 12), (0, 4, 12, 18), (0, 4, 18, 24),
                    (4, 8, 0, 6), (4, 8, 6, 12), (4, 8, 12, 18), (4, 8, 18, 24)]),
    ],
)
def test_cells_of_a_non_square_grid_worked_out_by_hand(rows, cols, num_cells, expected):
    # From the documented rule: bands = round(sqrt(8 * 24 / 8)) = 5 (tall) and
    # round(sqrt(8 * 8 / 24)) = 2 (wide); the 3 bands of the tall grid taking a second cell are
    # bands 1, 3 and 4 ((b + 1) * 3 // 5 - b * 3 // 5); boundaries floor(i * L / n).
    assert pooling_cells(rows, cols, num_cells) == expected


@settings(max_examples=100, deadline=None)
@given(problems())
def test_kept_tokens_hold_their_cell_means(problem):
    features, (rows, cols) = problem.signals.features, problem.signals.grid
    selection = pooling_selection(features, (rows, cols), problem.num_tokens)
    if problem.num_tokens >= rows * cols:
        assert selection.keep.all() and selection.features is None
        return
    expected_keep = torch.zeros(rows * cols, dtype=torch.bool)
    for top, bottom, left, right in pooling_cells(rows, cols, problem.num_tokens):
        members = [r * cols + c for r in range(top, bottom) for c in range(left, right)]
        centre = ((top + bottom - 1) // 2) * cols + (left + right - 1) // 2
        assert centre in members
        expected_keep[centre] = True
        mean = features[:, members].double().mean(dim=1)
        torch.testing.assert_close(selection.features[:, centre].double(), mean, rtol=1e-5, atol=1e-6)
    assert torch.equal(selection.keep, expected_keep.expand_as(selection.keep))
    untouched = ~selection.keep
    assert torch.equal(selection.features[untouched], features[untouched])


def test_half_precision_features_stay_half():
    features = torch.randn(1, 36, 4, dtype=torch.float16)
    assert pooling_selection(features, (6, 6), 9).features.dtype == torch.float16


def test_registered_and_needs_the_grid():
    method = get_method("pooling")
    assert method.needs == frozenset({"grid"}) and tuple(method.options) == ()
    with pytest.raises(ValueError, match=r"method 'pooling' needs the patch grid \(rows, cols\)"):
        method.select(VisionSignals(torch.randn(1, 4, 2), torch.rand(1, 4)), 2)


@pytest.mark.parametrize(
    "grid,message",
    [
        ((3, 5), r"grid rows \* cols must equal the number of patches N=16; got 3 x 5"),
        ((4,), r"grid must be a pair \(rows, cols\) of integers >= 1"),
        ((4.0, 4), r"grid must be a pair"),
        ((0, 16), r"grid must be a pair"),
        ("4x4", r"grid must be a pair"),
        ((True, 16), r"grid must be a pair"),
    ],
)
def test_bad_grid(grid, message):
    with pytest.raises(ValueError, match=message):
        pooling_selection(torch.randn(1, 16, 3), grid, 4)


def test_budget_of_one_is_the_global_mean():
    features = torch.randn(2, 12, 3)
    selection = pooling_selection(features, (3, 4), 1)
    torch.testing.assert_close(selection.features[selection.keep], features.mean(1))
    assert selection.keep.sum(1).tolist() == [1, 1]
