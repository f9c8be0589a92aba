"""Selections on a CUDA device replayed from CUDA graphs: one launch per call, not hundreds.

A selection loop at serving shapes (one LLaVA image, N = 576) is hundreds of small kernels. Launched
one by one from Python, each costs several microseconds of host time, which adds up to about the
whole pruned prefill. The loops of :mod:`.vispruner` and :mod:`.divprune` take no decision on the
device's values in Python (no ``.item()``, no ``nonzero``: their shapes follow from the input's
shape and the budget alone), so each is captured once per input shape, dtype and budget into a
CUDA graph and then replayed: a call copies its inputs into the graph's buffers, launches the
graph, and clones the outputs. The kernels are those of the eager code, in the same order on the
same values, so the masks are the same.

Off CUDA, with ``VISPRUNER_CUDA_GRAPHS=0``, or where a capture fails (the failure is remembered
for that shape and warned about once), the function runs eagerly.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from typing import Callable

import torch

from . import _triton

#: Captured graphs kept (least recently used dropped first); each holds its own memory pool.
MAX_GRAPHS = 16
#: Eager runs before a capture, on a side stream, as torch's capture recipe asks (lazy
#: initialisation of cuBLAS and the caching allocator must not happen inside a capture).
WARMUP = 2

Outputs = tuple[torch.Tensor, ...]
Key = tuple

_graphs: OrderedDict[Key, "_Graph | None"] = OrderedDict()
_lock = threading.Lock()


class _Graph:
    """One captured call: its input buffers, its graph and its output buffers."""

    def __init__(self, function: Callable[..., Outputs], inputs: Outputs, options: tuple) -> None:
        self.inputs = tuple(tensor.clone() for tensor in inputs)
        side = torch.cuda.Stream(device=inputs[0].device)
        side.wait_stream(torch.cuda.current_stream(inputs[0].device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                function(*self.inputs, *options)
        torch.cuda.current_stream(inputs[0].device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = function(*self.inputs, *options)

    def __call__(self, inputs: Outputs) -> Outputs:
        for buffer, tensor in zip(self.inputs, inputs):
            buffer.copy_(tensor)
        self.graph.replay()
        return tuple(tensor.clone() for tensor in self.outputs)


def enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` are replayed from graphs."""
    return device.type == "cuda" and os.environ.get("VISPRUNER_CUDA_GRAPHS", "1") != "0"


def run(function: Callable[..., Outputs], inputs: Outputs, *options: object) -> Outputs:
    """``function(*inputs, *options)``: a tuple of tensors, from a CUDA graph where possible.

    ``function`` must not read device values on the host; ``options`` (hashable) and the inputs'
    shapes, dtypes and device select the graph.
    """
    if not enabled(inputs[0].device) or torch.cuda.is_current_stream_capturing():
        return function(*inputs, *options)
    # A graph records the kernels its capture ran: one with the Triton kernels is not replayed
    # after ``VISPRUNER_TRITON=0`` (nor the other way round).
    key = (function, options, _triton.enabled(), tuple((t.shape, t.dtype, t.device) for t in inputs))
    with _lock:
        if key not in _graphs:
            _graphs[key] = _capture(function, inputs, options)
            while len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
        graph = _graphs[key]
        _graphs.move_to_end(key)
        if graph is not None:
            return graph(inputs)
    return function(*inputs, *options)


def _capture(function: Callable[..., Outputs], inputs: Outputs, options: tuple) -> _Graph | None:
    try:
        return _Graph(function, inputs, options)
    except Exception as error:  # noqa: BLE001 - any capture failure falls back to the same eager code
        warnings.warn(
            f"vispruner: {function.__qualname__} could not be captured into a CUDA graph for inputs of shape "
            f"{[tuple(tensor.shape) for tensor in inputs]} ({type(error).__name__}: {error}); it runs eagerly "
            "(same masks, more kernel launches)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def clear() -> None:
    """Drop every captured graph (and its memory)."""
    with _lock:
        _graphs.clear()
