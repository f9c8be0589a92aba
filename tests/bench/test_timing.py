"""The prefill breakdown times the method's hooks and leaves the model as it found it."""

from __future__ import annotations

import time

import pytest
import torch

from vispruner.bench.timing import DecodeClock, PrefillBreakdown, dispatched_ops, hook_keys


class Pair(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x):
        time.sleep(0.03)  # glue outside the parts
        return self.head(self.inner(x))


def sleep_hook(seconds):
    def hook(module, inputs, output=None):
        time.sleep(seconds)

    return hook


def test_hooks_inside_parts_are_timed_and_glue_is_outside():
    model = Pair()
    before = hook_keys(model)
    applied = sleep_hook(0.05)
    model.inner[0].register_forward_hook(applied)  # added "at apply time"

    def run():  # and one registered during the forward, as the adapters do
        handle = model.inner[1].register_forward_pre_hook(sleep_hook(0.04))
        try:
            model(torch.ones(1, 4))
        finally:
            handle.remove()

    breakdown = PrefillBreakdown({"inner": model.inner, "head": model.head}, torch.device("cpu"), before)
    with breakdown.measure():
        run()
    ms = breakdown.ms
    assert 90 <= ms["hooks"] <= ms["inner"]
    assert 30 <= ms["outside"] < 90
    assert ms["total"] == pytest.approx(ms["inner"] + ms["head"] + ms["outside"])
    assert list(model.inner[0]._forward_hooks.values()) == [applied]


def test_breakdown_restores_the_model():
    model = Pair()
    hook = sleep_hook(0)
    model.inner[0].register_forward_hook(hook)
    before = hook_keys(model)
    with PrefillBreakdown({"inner": model.inner}, torch.device("cpu"), {}).measure():
        model(torch.ones(1, 4))
    assert all("forward" not in vars(m) and "register_forward_hook" not in vars(m) for m in model.modules())
    assert list(model.inner[0]._forward_hooks.values()) == [hook]
    assert hook_keys(model) == before


def test_decode_clock_needs_two_tokens():
    clock = DecodeClock(torch.device("cpu"))
    clock.stamps = [1.0, 1.5, 2.0]
    assert clock.ms_per_token() == pytest.approx(500.0)
    clock.stamps = [1.0]
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        clock.ms_per_token()


def test_dispatched_ops_counts_each_op_once_views_included():
    x = torch.ones(4, 4)
    # add, a view (transpose), mul: three ops; a Python-only computation: none.
    assert dispatched_ops(lambda: (x + 1).t() * 2) == 3
    assert dispatched_ops(lambda: sum(range(10))) == 0
