"""KV-cache size and peak tensor memory of a run.

Peak memory is the most bytes held by tensors at any moment of the run, weights and inputs
included. On CUDA it is the caching allocator's own peak (``torch.cuda.max_memory_allocated``).
The CPU allocator keeps no statistics, so on CPU a dispatch mode watches every tensor storage
that an operator creates and adds its size until the storage is freed; buffers that kernels
use internally and free before returning are not seen, so the CPU figure is a lower bound.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def kv_cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values held by a transformers cache (e.g. ``DynamicCache``); the
    fixed-size states of linear-attention layers (Qwen3.5's), which hold no keys, are not counted."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def resident_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights count once)."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class _StorageWatch(TorchDispatchMode):
    """Live and peak bytes of the storages that operators allocate while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            # A view or an in-place result shares an input's storage: nothing new was allocated.
            if key in inputs or key in self._seen:
                continue
            self._seen.add(key)
            size = storage.nbytes()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


class PeakMemory:
    """``peak_bytes`` after the ``with`` block: weights, inputs and everything allocated in it."""

    def __init__(self, device: torch.device, resident: int) -> None:
        self.device = device
        self.resident = resident
        self.peak_bytes = 0

    @contextmanager
    def measure(self) -> Iterator["PeakMemory"]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        watch = _StorageWatch()
        with watch:
            yield self
        self.peak_bytes = self.resident + watch.peak
