"""Wall-clock timing: synchronised clocks, per-step decode times, and where prefill time goes.

On CUDA every reading waits for the device (``torch.cuda.synchronize``), so kernels launched
before a reading are counted in it; on CPU work is synchronous.
"""

from __future__ import annotations

import functools
import statistics
import time
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LogitsProcessor


def now(device: torch.device) -> float:
    """Seconds on a monotonic clock, after everything queued on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median(values: list[float]) -> float:
    return statistics.median(values)


def interleaved_medians(functions: Sequence[Callable[[], Any]], repeats: int) -> list[float]:
    """Median seconds of each function (wall clock), after one warm-up call each, run in turn so
    that machine noise hits all alike; for benchmark scripts that compare ways side by side."""
    for fn in functions:
        fn()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for fn, bucket in zip(functions, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


class _Dispatched(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(function: Callable[[], Any]) -> int:
    """The aten ops ``function()`` dispatches (views included), as a ``TorchDispatchMode`` sees
    them: off the CPU, each op that is not a view is a kernel launch. Work done outside torch
    (a native library called through ctypes) is not seen; count it separately."""
    with _Dispatched() as mode:
        function()
    return mode.count


class DecodeClock(LogitsProcessor):
    """A logits processor that only reads the clock: generation calls it once per new token.

    Call ``i`` comes right after the forward of step ``i`` (step 0 is the prefill), so the gaps
    between calls are the decode steps, each with its sampling bookkeeping.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(now(self.device))
        return scores

    def ms_per_token(self) -> float:
        """Mean decode step after the prefill, in milliseconds (needs two or more tokens)."""
        steps = len(self.stamps) - 1
        if steps < 1:
            raise ValueError("new_tokens must be >= 2 to time a decode step")
        return (self.stamps[-1] - self.stamps[0]) * 1e3 / steps


def hook_keys(model: torch.nn.Module) -> dict[int, set[tuple[str, int]]]:
    """The forward (pre-)hooks on each module of ``model``, to tell later which ones are new."""
    return {id(module): set(_hooks(module)) for module in model.modules()}


def _hooks(module: torch.nn.Module) -> Iterator[tuple[str, int]]:
    for table in ("_forward_pre_hooks", "_forward_hooks"):
        for key in getattr(module, table):
            yield table, key


class PrefillBreakdown:
    """Where one prefill's time goes, with ``parts`` (name -> module) timed separately.

    ``parts`` are the stock modules of the model (vision tower, projector, language model, LM
    head). Their ``forward`` is timed, not the hooks on them. Hooks on modules *inside* the
    parts that a pruning method added (since ``before``, a :func:`hook_keys` snapshot, or
    registered during the run, as the adapters do for the [CLS] row) are timed too: their time
    would otherwise hide inside a part. After :meth:`measure`:

    * ``ms[name]``: time inside each part's forward, its inner hooks included;
    * ``ms["hooks"]``: time in the method's hooks inside the parts;
    * ``ms["outside"]``: the rest of the forward: the model's own glue and, when patched, the
      method's selection, the compaction of the sequence and hooks on the parts themselves.
    """

    def __init__(
        self,
        parts: dict[str, torch.nn.Module],
        device: torch.device,
        before: dict[int, set[tuple[str, int]]] | None = None,
    ) -> None:
        self.parts = parts
        self.device = device
        self.before = before
        self.ms: dict[str, float] = {}

    def _time_into(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = now(self.device)
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[name] = self.ms.get(name, 0.0) + (now(self.device) - start) * 1e3

        return timed

    def _timed_registration(self, register: Callable) -> Callable:
        def registration(hook: Callable, *args, **kwargs):
            return register(self._time_into("hooks", hook), *args, **kwargs)

        return registration

    @contextmanager
    def measure(self) -> Iterator["PrefillBreakdown"]:
        self.ms = {name: 0.0 for name in (*self.parts, "hooks")}
        with ExitStack() as restore:
            for name, part in self.parts.items():
                restore.enter_context(_replaced(part.__dict__, "forward", self._time_into(name, part.forward)))
                for module in part.modules():
                    if module is not part:
                        restore.enter_context(self._time_hooks(module))
            start = now(self.device)
            yield self
            total = (now(self.device) - start) * 1e3
        self.ms["outside"] = total - sum(self.ms[name] for name in self.parts)
        self.ms["total"] = total

    @contextmanager
    def _time_hooks(self, module: torch.nn.Module) -> Iterator[None]:
        with ExitStack() as restore:
            if self.before is not None and id(module) in self.before:
                for table, key in set(_hooks(module)) - self.before[id(module)]:
                    hooks = getattr(module, table)
                    restore.enter_context(_replaced(hooks, key, self._time_into("hooks", hooks[key])))
            for name in ("register_forward_pre_hook", "register_forward_hook"):
                timed = self._timed_registration(getattr(module, name))
                restore.enter_context(_replaced(module.__dict__, name, timed))
            yield


@contextmanager
def _replaced(table: dict, key: Any, value: Any) -> Iterator[None]:
    """``table[key] = value`` for the duration; the earlier entry (or its absence) comes back."""
    missing = object()
    old = table.get(key, missing)
    table[key] = value
    try:
        yield
    finally:
        if old is missing:
            del table[key]
        else:
            table[key] = old
