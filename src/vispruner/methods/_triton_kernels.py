"""The Triton kernels of :mod:`._triton` (imported only where Triton is; see there for what they do).

Triton resolves a kernel's callees among its module's globals, so they live at module level here.
"""

import triton
import triton.language as tl


@triton.jit
def compare_exchange(keys, values, t, size: tl.constexpr, stride: tl.constexpr, final: tl.constexpr):
    # One stage of PyTorch's bitonicSort (SortUtils.cuh): thread t of 16 compares slots pos and
    # pos + stride and swaps when (kA > kB and validA) or not validB equals its direction.
    pos = 2 * t - (t & (stride - 1))
    if final:
        direction = t < 0  # all False
    else:
        direction = (t & (size // 2)) != 0
    key_a = tl.load(keys + pos)
    key_b = tl.load(keys + pos + stride)
    value_a = tl.load(values + pos)
    value_b = tl.load(values + pos + stride)
    swap = ((key_a > key_b) & (value_a >= 0)) | (value_b < 0)
    exchange = swap == direction
    tl.debug_barrier()
    tl.store(keys + pos, tl.where(exchange, key_b, key_a))
    tl.store(keys + pos + stride, tl.where(exchange, key_a, key_b))
    tl.store(values + pos, tl.where(exchange, value_b, value_a))
    tl.store(values + pos + stride, tl.where(exchange, value_a, value_b))
    tl.debug_barrier()

@triton.jit
def remove_duplicates(
    similarity,  # (B, R, R) float32
    lists,  # (B, 2, R_BLOCK) int32 scratch: the list, double-buffered
    keys,  # (B, A_BLOCK) float32 scratch: closeness, then the bitonic keys
    values,  # (B, 32) int32 scratch: the bitonic values (-1: empty slot)
    ranks,  # (B, A_BLOCK) int32 scratch: the stable order's ranks
    out,  # (B, budget) int64: rows of the survivors, in list order
    length,
    budget,
    steps,
    STEP: tl.constexpr,
    R_BLOCK: tl.constexpr,
    A_BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    image = tl.program_id(0)
    similarity += image.to(tl.int64) * length * length
    lists += image * 2 * R_BLOCK
    keys += image * A_BLOCK
    values += image * 32
    ranks += image * A_BLOCK
    out += image * budget

    every = tl.arange(0, R_BLOCK)
    tl.store(lists + every, every, mask=every < length)
    tl.debug_barrier()
    rows = tl.arange(0, A_BLOCK)
    slots = tl.arange(0, 32)
    threads = tl.arange(0, 16)
    current = 0
    remaining = length
    for _ in range(steps):
        source = lists + current * R_BLOCK
        target = lists + (1 - current) * R_BLOCK
        count_a = (remaining + 1) // 2
        count_b = remaining // 2
        drop = tl.minimum(tl.minimum(remaining - budget, count_a), STEP)
        in_a = rows < count_a
        side_a = tl.load(source + 2 * rows, mask=in_a, other=0)
        closeness = tl.full([A_BLOCK], float("-inf"), tl.float32)
        for start in range(0, count_b, CHUNK):
            columns = start + tl.arange(0, CHUNK)
            in_b = columns < count_b
            side_b = tl.load(source + 2 * columns + 1, mask=in_b, other=0)
            cells = tl.load(
                similarity + side_a[:, None] * length + side_b[None, :],
                mask=in_a[:, None] & in_b[None, :],
                other=float("-inf"),
            )
            closeness = tl.maximum(closeness, tl.max(cells, axis=1))
        # A lone A token (no B) scores 0. Signed zeros need no care here: the ranks below compare.
        closeness = tl.where(count_b > 0, closeness, 0.0)
        tl.store(keys + rows, closeness, mask=in_a)
        tl.debug_barrier()
        if count_a > 32:
            # Stable descending order: rank = values greater + equal values listed before.
            rank = tl.zeros([A_BLOCK], tl.int32)
            for start in range(0, count_a, CHUNK):
                others = start + tl.arange(0, CHUNK)
                other = tl.load(keys + others, mask=others < count_a, other=float("-inf"))
                before = (other[None, :] > closeness[:, None]) | (
                    (other[None, :] == closeness[:, None]) & (others[None, :] < rows[:, None])
                )
                before = before & (others < count_a)[None, :]
                rank += tl.sum(before.to(tl.int32), axis=1)
            # Through memory before it becomes an address: Triton's analysis takes the loop's
            # initial zeros for equal ranks and merges the stores of a thread's neighbouring rows.
            tl.store(ranks + rows, rank, mask=in_a)
            tl.debug_barrier()
            rank = tl.load(ranks + rows, mask=in_a, other=0)
            tl.store(target + rank - drop, side_a, mask=in_a & (rank >= drop))
        else:
            tl.store(values + slots, tl.where(slots < count_a, slots, -1))
            tl.debug_barrier()
            for level in tl.static_range(1, 5):
                for down in tl.static_range(0, level):
                    compare_exchange(keys, values, threads, 1 << level, 1 << (level - 1 - down), False)
            for down in tl.static_range(0, 5):
                compare_exchange(keys, values, threads, 32, 1 << (4 - down), True)
            ranked = tl.load(values + slots)
            token = tl.load(source + 2 * ranked, mask=(slots >= drop) & (slots < count_a), other=0)
            tl.store(target + slots - drop, token, mask=(slots >= drop) & (slots < count_a))
        in_b = rows < count_b
        side_b = tl.load(source + 2 * rows + 1, mask=in_b, other=0)
        tl.store(target + count_a - drop + rows, side_b, mask=in_b)
        tl.debug_barrier()
        remaining -= drop
        current = 1 - current
    survivors = tl.load(lists + current * R_BLOCK + every, mask=every < budget, other=0)
    tl.store(out + every, survivors.to(tl.int64), mask=every < budget)

@triton.jit
def greedy_max_min(
    similarity,  # (B, N, N) float32, diagonal -inf
    first,  # (B,) int64
    keep,  # (B, N) bool, all False
    tokens,
    count,
    N_BLOCK: tl.constexpr,
):
    image = tl.program_id(0)
    similarity += image.to(tl.int64) * tokens * tokens
    keep += image * tokens
    columns = tl.arange(0, N_BLOCK)
    valid = columns < tokens
    pick = tl.load(first + image).to(tl.int32)
    chosen = columns == pick
    nearest = tl.load(similarity + pick * tokens + columns, mask=valid, other=float("inf"))
    for _ in range(count - 1):
        pick = tl.argmin(tl.where(chosen | ~valid, float("inf"), nearest), axis=0)
        chosen = chosen | (columns == pick)
        row = tl.load(similarity + pick * tokens + columns, mask=valid, other=float("inf"))
        nearest = tl.maximum(nearest, row)
    tl.store(keep + columns, chosen, mask=valid)
