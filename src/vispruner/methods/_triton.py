"""Selection loops on a CUDA GPU in one Triton kernel launch: one program per image runs every step.

Eager, VisPruner's duplicate removal is a dozen kernels per step (64 steps for a LLaVA-1.5 image)
and DivPrune's greedy max-min a handful per chosen token; even replayed from a CUDA graph
(:mod:`._graphs`) that is about a thousand kernels, which take longer than the similarity itself.
Here each image's whole loop is one Triton program that keeps its list in a small scratch buffer
and reads the similarity the eager code computed; the steps are the eager code's, on the same
elements, so the masks are the same:

* A step ranks A by ``torch.argsort(closeness, descending=True)``, whose order of tied values is
  CUDA's: for at most 32 values, the bitonic network of ``SmallBitonicSort`` (unstable: ties swap),
  replayed here comparison for comparison; for more, a stable order (warp merge sort up to 128,
  block radix sort up to 4,096), which is rank = #greater + #equal before. The radix sort would
  order -0.0 below +0.0 where a comparison ties them, but the eager closeness never holds -0.0
  (it adds 0.0, B's penalty, before its maximum), so the two orders agree.
* DivPrune takes ``argmin`` (first index among ties, as torch documents) of the nearest-chosen
  similarities with chosen tokens masked to +inf, and keeps a running maximum.

:func:`usable` says whether the kernels apply (an NVIDIA CUDA tensor, Triton importable, lengths the
kernel is sized for, ``VISPRUNER_TRITON`` not ``0``, no kernel failed before in this process);
elsewhere the eager code runs, with the same masks.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch

#: Longest residual list the duplicate-removal kernel takes: one program per image runs the
#: whole loop, which beats a thousand small kernels for LLaVA-sized images, not at high resolution.
MAX_RESIDUAL = 1024
#: Most tokens per image the greedy max-min kernel takes (one program keeps a row in registers).
MAX_TOKENS = 4096
#: CUDA's SmallBitonicSort sorts up to this many values in one 32-slot network.
BITONIC = 32
#: No software pipelining: the loops read what the same program wrote a step earlier.
NUM_STAGES = 1


def _kernels():  # noqa: ANN202 - the module of Triton JIT functions
    from . import _triton_kernels

    return _triton_kernels


def enabled() -> bool:
    """Whether the Triton kernels may be used at all (``VISPRUNER_TRITON=0`` turns them off)."""
    if os.environ.get("VISPRUNER_TRITON", "1") == "0":
        return False
    return _importable()


@functools.cache
def _importable() -> bool:
    try:
        _kernels()
    except Exception:  # noqa: BLE001 - no Triton, or one that cannot build these kernels: eager code
        return False
    return True


def usable(tensor: torch.Tensor, length: int, limit: int) -> bool:
    """Whether a kernel runs for ``tensor``'s device and a list of ``length`` (at most ``limit``):
    NVIDIA CUDA only (the tie order replayed is CUDA's sort's), and no kernel failed before."""
    cuda = tensor.device.type == "cuda" and torch.version.hip is None
    return cuda and length <= limit and not _failed and enabled()


#: Set when a kernel failed to compile or launch (an old GPU, a Triton too old or too new):
#: the eager code runs from then on in this process, after one warning.
_failed: list[str] = []


def _launch(name: str, launch: Callable[[], None]) -> bool:
    """Run ``launch``; False (and eager code from then on, with a warning) if it raises."""
    try:
        launch()
    except Exception as error:  # noqa: BLE001 - any failure falls back to the same eager steps
        _failed.append(name)
        warnings.warn(
            f"vispruner: the Triton kernel {name} failed ({type(error).__name__}: {error}); the selection "
            "loops run as tensor ops from now on (same masks, more kernel launches)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _block(size: int) -> int:
    return max(16, 1 << max(0, size - 1).bit_length())


def remove_duplicates(similarity: torch.Tensor, budget: int, steps: int, step: int) -> torch.Tensor | None:
    """(B, budget) int64 rows of ``similarity`` (B, R, R) float32 that survive duplicate removal,
    in list order: what :func:`.vispruner._remove_duplicates_dense` returns, for 0 < budget < R;
    None if the kernel failed (see :func:`_launch`). ``steps``: how many the loop takes, each
    dropping up to ``step`` tokens (VisPruner's rule, which :mod:`.vispruner` owns)."""
    batch, length, _ = similarity.shape
    r_block = _block(length)
    a_block = max(BITONIC, _block((length + 1) // 2))
    device = similarity.device
    lists = torch.empty(batch, 2, r_block, dtype=torch.int32, device=device)
    keys = torch.empty(batch, a_block, dtype=torch.float32, device=device)
    values = torch.empty(batch, BITONIC, dtype=torch.int32, device=device)
    ranks = torch.empty(batch, a_block, dtype=torch.int32, device=device)
    out = torch.empty(batch, budget, dtype=torch.int64, device=device)
    launched = _launch("remove_duplicates", lambda: _kernels().remove_duplicates[(batch,)](
        similarity.contiguous(), lists, keys, values, ranks, out, length, budget, steps,
        STEP=step, R_BLOCK=r_block, A_BLOCK=a_block, CHUNK=max(8, min(64, 8192 // a_block)),
        # At least one thread per row of A (MAX_RESIDUAL keeps A within 512 rows): where a thread
        # held two, the compiled kernel (Triton 3.6, H200) returned wrong lists, which Triton's
        # interpreter does not; measured, not understood.
        num_warps=min(16, max(4, a_block // 32)), num_stages=NUM_STAGES,
    ))
    return out if launched else None


def greedy_max_min(similarity: torch.Tensor, first: torch.Tensor, count: int) -> torch.Tensor | None:
    """(B, N) keep mask of DivPrune's greedy max-min from ``first`` (B,) on ``similarity`` (B, N, N)
    float32 with a -inf diagonal: what the eager loop of :mod:`.divprune` returns; None if the
    kernel failed (see :func:`_launch`)."""
    batch, tokens, _ = similarity.shape
    keep = torch.zeros(batch, tokens, dtype=torch.bool, device=similarity.device)
    launched = _launch("greedy_max_min", lambda: _kernels().greedy_max_min[(batch,)](
        similarity.contiguous(), first.contiguous(), keep, tokens, count,
        N_BLOCK=_block(tokens), num_warps=4, num_stages=NUM_STAGES,
    ))
    return keep if launched else None
