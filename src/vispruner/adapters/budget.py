"""How a budget becomes token counts (pure Python: the CLI checks budgets before loading torch)."""

from __future__ import annotations

import math


def ratio_tokens(ratio: float, size: int) -> int:
    """``ratio * size`` rounded half up, at least 1: the documented rounding of ``keep_ratio``."""
    return max(1, math.floor(ratio * size + 0.5))


def shared_tokens(num_tokens: int, pieces: int) -> list[int]:
    """``num_tokens`` split over ``pieces``: the first ``num_tokens % pieces`` get one more, each at least 1."""
    base, extra = divmod(num_tokens, pieces)
    return [max(1, base + (index < extra)) for index in range(pieces)]
