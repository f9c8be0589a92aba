"""Small CPU ops on the calling thread alone.

An op that runs on several threads ends in an OpenMP barrier, and on a busy CPU every barrier
waits for a core, which can take far longer than the op: beside other jobs on the 2-core
sandbox, one aminmax over a LLaVA image's features took 24 ms on two threads and 0.3 ms on one.
Only ops whose result does not depend on how the work is split are run this way (elementwise
ops, copies, gathers, min and max, and norms over the last dimension of two or more rows, which
torch reduces one row per thread), so results are the same bits at any thread count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: Ops on fewer elements than this (8 MiB of float32) run on one thread inside :func:`serial`.
SERIAL_BELOW = 2**21


@contextlib.contextmanager
def serial(device: torch.device, elements: int = 0) -> Iterator[None]:
    """Run the CPU ops inside on the calling thread alone, if they touch fewer than
    :data:`SERIAL_BELOW` ``elements`` (the default, 0, always)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or elements >= SERIAL_BELOW:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
