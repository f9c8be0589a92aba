"""Native step loops for the CPU: a whole selection loop in one call, where the eager code
dispatches a handful of tensor ops per step (VisPruner: ~30 per step, 2,000 ops per LLaVA image).

``_native.cpp`` ships with the package and is compiled on first use by the machine's C++
compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``) into the user cache directory
(``$XDG_CACHE_HOME/vispruner`` or ``~/.cache/vispruner``), once per source and compiler. It is
used only if its sort orders tied values exactly as torch's CPU sort does on this machine,
checked once per process: VisPruner's steps rank scores with torch's unstable sort, and the
masks must not change. Without a compiler, when the build or that check fails, or with
``VISPRUNER_NATIVE=0``, :func:`library` is None and the methods run their eager code, which
gives the same masks.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import torch

SOURCE = Path(__file__).with_name("_native.cpp")
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be used (see the module docstring)."""
    if os.environ.get("VISPRUNER_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        native = _declare(ctypes.CDLL(str(_build(compiler))))
    except (OSError, subprocess.SubprocessError):
        return None
    return native if _sorts_like_torch(_argsort(native)) else None


def _compiler() -> str | None:
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return next((path for path in map(shutil.which, names) if path), None)


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vispruner"
    target = cache / f"native-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes building at once never load half a file.
    handle, partial = tempfile.mkstemp(dir=cache, suffix=".so")
    os.close(handle)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], check=True, capture_output=True, timeout=300)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _declare(native: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    native.vp_argsort_descending.argtypes = [pointer, size, pointer]
    native.vp_remove_duplicates.argtypes = [pointer, size, size, size, pointer]
    native.vp_greedy_max_min.argtypes = [pointer, pointer, size, size, size, pointer]
    for function in (native.vp_argsort_descending, native.vp_remove_duplicates, native.vp_greedy_max_min):
        function.restype = None
    return native


def _sorts_like_torch(argsort: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``argsort`` (of a float32 vector, descending) orders ties as torch's CPU sort
    does here, on lists with many ties and signed zeros, from insertion-sort sizes to thousands,
    as one row and as rows of a batch (as the steps sort them)."""
    generator = torch.Generator().manual_seed(0)
    for size in (5, 17, 31, 100, 288, 1000, 4097, 9000):
        values = torch.randint(-3, 4, (size,), generator=generator).float().div_(7)
        values[torch.rand(size, generator=generator) < 0.1] = -0.0
        order = argsort(values)
        rows = torch.argsort(values.expand(2, -1), dim=1, descending=True)
        if not (torch.equal(order, torch.argsort(values, descending=True)) and torch.equal(order, rows[1])):
            return False
    return True


def _argsort(native: ctypes.CDLL) -> Callable[[torch.Tensor], torch.Tensor]:
    def argsort(values: torch.Tensor) -> torch.Tensor:
        out = torch.empty(values.shape[0], dtype=torch.int64)
        native.vp_argsort_descending(_address(values, torch.float32), values.shape[0], out.data_ptr())
        return out

    return argsort


def _address(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    if tensor.device.type != "cpu" or tensor.dtype != dtype or not tensor.is_contiguous():
        raise ValueError(f"native kernels take contiguous CPU {dtype} tensors; got {tensor.dtype} on {tensor.device}")
    return tensor.data_ptr()


def remove_duplicates(native: ctypes.CDLL, similarity: torch.Tensor, budget: int) -> torch.Tensor:
    """(B, budget) positions of the tokens that survive VisPruner's duplicate removal, in the
    final list's order, from the (B, R, R) float32 similarity; 0 <= budget < R."""
    batch, length, _ = similarity.shape
    out = torch.empty(batch, budget, dtype=torch.int64)
    native.vp_remove_duplicates(_address(similarity, torch.float32), batch, length, budget, out.data_ptr())
    return out


def greedy_max_min(native: ctypes.CDLL, similarity: torch.Tensor, first: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N) bool: ``count`` tokens per image chosen by DivPrune's greedy max-min from the
    (B, N, N) float32 similarity (-inf diagonal), starting at ``first`` (B,)."""
    batch, tokens, _ = similarity.shape
    keep = torch.zeros(batch, tokens, dtype=torch.bool)
    native.vp_greedy_max_min(
        _address(similarity, torch.float32), _address(first, torch.int64), batch, tokens, count, keep.data_ptr()
    )
    return keep
