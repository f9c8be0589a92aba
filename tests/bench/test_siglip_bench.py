"""The bench path on tiny LLaVA-OneVision and Gemma 3 models (the published presets are too large
for CI): the budget unit, the stock token count, and LM FLOPs by formula = counted."""

from __future__ import annotations

import pytest

from vispruner.bench.runner import BenchSettings, run_bench
from vispruner.eval.budgets import visual_tokens

from ..tiny_models import GEMMA_TOKENS, OV_SIDE, tiny_gemma3, tiny_onevision


@pytest.mark.parametrize("build, unit", [(tiny_gemma3, GEMMA_TOKENS), (tiny_onevision, OV_SIDE**2)])
def test_bench_runs_on_siglip_families(build, unit):
    settings = BenchSettings(tokens=(8,), methods=("vispruner",), repeats=1, warmup=0, text_tokens=8, new_tokens=2)
    model = build()
    result = run_bench(model, settings, progress=False)
    assert result.meta["patches_per_crop"] == unit
    assert visual_tokens(model.config) == unit  # what the CLI reads from a config before loading
    full, pruned = result.rows
    assert pruned["num_tokens"] == 8 and result.meta["skipped"] == []
    assert pruned["llm_prefill_tflops_analytic"] < full["llm_prefill_tflops_analytic"]
    for row in result.rows:
        assert row["llm_prefill_tflops_counted"] == pytest.approx(row["llm_prefill_tflops_analytic"], rel=1e-6)
