"""The Triton kernels (one launch per selection loop on a GPU) against the eager steps.

On the CPU they run under Triton's interpreter, against the step-by-step loop of ``cuda_order``
(CUDA's order of ties written out; the interpreter's argmin always breaks ties to the left, so
there it cannot tell DivPrune's tie rule from another); on a CUDA device, against the library's eager GPU path on
tie-heavy inputs and the golden masks, and the CUDA order against CUDA's own sort. (The
independent reference's comparison on CUDA is test_vispruner_properties', which now runs the
kernel.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vispruner
from vispruner.methods import _graphs, _triton
from vispruner.methods import vispruner as vispruner_module
from vispruner.methods.divprune import divprune_selection

from . import cuda_order
from .test_native import problems
from .test_vispruner_exact import golden_cases

has_triton = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not has_triton, reason="Triton is not installed")
needs_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_triton), reason="needs a CUDA device and Triton"
)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA device the compiled kernels are tested")
def test_interpreted_kernels_equal_the_step_by_step_loop():
    script = Path(__file__).with_name("triton_interpreted.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_step_count_follows_the_published_steps():
    # 544 residual tokens to 32: 64 steps of 8; 9 to 8: one step; a step never drops more than A.
    step_count = vispruner_module._step_count
    assert step_count(544, 32) == 64
    assert step_count(9, 8) == 1
    assert step_count(3, 1) == 1  # A holds 2 of the 3: one step drops both
    assert step_count(4, 1) == 2  # A holds 2 of 4: 4 -> 2 -> 1
    assert step_count(5, 5) == 0


def test_off_cuda_the_kernels_are_not_used():
    assert not _triton.usable(torch.zeros(3), 3, _triton.MAX_RESIDUAL)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("VISPRUNER_TRITON", "0")
    assert not _triton.enabled()


def test_a_failing_kernel_warns_once_and_leaves_the_eager_code(monkeypatch):
    monkeypatch.setattr(_triton, "_failed", [])

    def broken() -> None:
        raise RuntimeError("no kernel image for this GPU")

    with pytest.warns(RuntimeWarning, match="no kernel image for this GPU"):
        assert not _triton._launch("remove_duplicates", broken)
    assert _triton._failed == ["remove_duplicates"]
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(_triton, "enabled", lambda: True)
    assert not _triton.usable(torch.zeros(3), 3, _triton.MAX_RESIDUAL)
    monkeypatch.setattr(_triton, "_failed", [])
    assert _triton.usable(torch.zeros(3), 3, _triton.MAX_RESIDUAL) == (torch.version.hip is None)


def without_triton(function, *args):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VISPRUNER_TRITON", "0")
        return function(*args)


@needs_cuda_triton
@settings(max_examples=6, deadline=None)
@given(st.lists(st.floats(-2, 2, width=32), min_size=1, max_size=300), st.integers(1, 6))
def test_cuda_order_is_cudas_own(values, levels):
    # Few distinct values: ties everywhere, where the bitonic network and the stable sorts differ.
    rounded = [round(v * levels) / levels for v in values]
    for count in sorted({len(rounded), min(len(rounded), 32), min(len(rounded), 17)}):
        row = torch.tensor(rounded[:count], device="cuda")
        assert torch.argsort(row, descending=True).tolist() == cuda_order.argsort_descending(rounded[:count])


@needs_cuda_triton
@settings(max_examples=60, deadline=None)
@given(problems())
def test_kernels_equal_the_eager_gpu_path(problem):
    features, attention, num_tokens, ratio = (x.cuda() if torch.is_tensor(x) else x for x in problem)
    os.environ["VISPRUNER_CUDA_GRAPHS"] = "0"
    try:
        expected = without_triton(vispruner.select, features, attention, num_tokens, ratio)
        assert torch.equal(vispruner.select(features, attention, num_tokens, ratio), expected)
        expected = without_triton(lambda: divprune_selection(features, num_tokens).keep)
        assert torch.equal(divprune_selection(features, num_tokens).keep, expected)
    finally:
        del os.environ["VISPRUNER_CUDA_GRAPHS"]


@needs_cuda_triton
def test_kernel_gives_the_golden_masks(data_dir):
    for case, features, attention, expected in golden_cases(data_dir):
        keep = vispruner.select(features.cuda(), attention.cuda(), case["visual_token_num"], case["important_ratio"])
        assert torch.equal(keep.cpu(), expected.bool()), f"golden case {case}"


@needs_cuda_triton
def test_a_llava_selection_is_a_few_dozen_kernels():
    from torch.profiler import ProfilerActivity, profile

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, 576, 1024, generator=generator).cuda()
    attention = torch.rand(1, 16, 576, generator=generator).cuda()
    _graphs.clear()
    vispruner.select(features, attention, 64)  # compiles and captures
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        vispruner.select(features, attention, 64)
        torch.cuda.synchronize()
    launched = sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
    assert launched <= 50, launched
