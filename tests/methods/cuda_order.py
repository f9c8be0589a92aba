"""How CUDA's ``torch.argsort(values, descending=True)`` orders a row, written out for the CPU,
whose sort orders tied values otherwise; and VisPruner's duplicate removal on that order.

PyTorch's CUDA sort (aten/src/ATen/native/cuda/Sort.cpp, ``sortKeyValueInplace``) sorts a row of
at most 32 values, when no stable sort is asked, with a 32-slot bitonic network run by 16 threads
(``SmallBitonicSort``, SortUtils.cuh), which swaps tied values; longer rows go to a warp merge
sort (up to 128) or a block radix sort (up to 4,096), both stable. ``test_triton.py`` checks this
against the GPU's own sort where there is one.
"""

from __future__ import annotations

import torch


def argsort_descending(values: list[float]) -> list[int]:
    """Indices of ``values`` in the order CUDA's unstable descending argsort lists them."""
    count = len(values)
    if count > 32:
        return sorted(range(count), key=lambda i: (-values[i], i))
    keys = [values[i] if i < count else 0.0 for i in range(32)]
    slots = [i if i < count else -1 for i in range(32)]  # -1: an empty slot, sorted to the end

    def stage(size: int, stride: int, final: bool) -> None:
        for thread in range(16):
            pos = 2 * thread - (thread & (stride - 1))
            direction = False if final else (thread & (size // 2)) != 0
            key_a, key_b = keys[pos], keys[pos + stride]
            valid_a, valid_b = slots[pos] >= 0, slots[pos + stride] >= 0
            if ((key_a > key_b and valid_a) or not valid_b) == direction:
                keys[pos], keys[pos + stride] = key_b, key_a
                slots[pos], slots[pos + stride] = slots[pos + stride], slots[pos]

    size = 2
    while size < 32:
        stride = size // 2
        while stride:
            stage(size, stride, False)
            stride //= 2
        size *= 2
    stride = 16
    while stride:
        stage(32, stride, True)
        stride //= 2
    return slots[:count]


def remove_duplicates(similarity: torch.Tensor, budget: int) -> list[int]:
    """Rows of one (R, R) ``similarity`` that survive VisPruner's duplicate removal, in list
    order, step by step, with CUDA's order of ties."""
    listed = list(range(similarity.shape[0]))
    while len(listed) > budget:
        side_a, side_b = listed[0::2], listed[1::2]
        drop = min(8, len(listed) - budget, len(side_a))
        if side_b:
            # + 0.0 as the library's masked maximum adds it: -0.0 counts as +0.0.
            closeness = [max(float(similarity[i, j]) for j in side_b) + 0.0 for i in side_a]
        else:
            closeness = [0.0] * len(side_a)
        listed = [side_a[k] for k in argsort_descending(closeness)[drop:]] + side_b
    return listed
