"""The bench path on tiny models of the families added with issue 23 (the published presets are
too large for CI): the budget unit, and LM FLOPs by formula = counted (FastV: but for its score row)."""

from __future__ import annotations

import pytest

from vispruner.bench.presets import PRESETS
from vispruner.bench.runner import BenchSettings, run_bench
from vispruner.eval.budgets import visual_tokens

from ..tiny_gemma4 import tiny_gemma4
from ..tiny_internvl import TOKENS as INTERNVL_TOKENS
from ..tiny_internvl import tiny_internvl
from ..tiny_mistral3 import tiny_mistral3
from ..tiny_smolvlm import TOKENS as SMOLVLM_TOKENS
from ..tiny_smolvlm import tiny_idefics3

#: family -> (tiny model builder taking text_layers, visual tokens per tile or image, preset, its tokens).
CASES = {
    "internvl": (tiny_internvl, INTERNVL_TOKENS, "internvl3-8b", 256),
    # The tiny tower's largest image: 64 px, 8 x 8 merged tokens; the preset's at 1024 px: 36 x 36.
    "mistral3": (tiny_mistral3, 64, "mistral-small-3.1-24b", 36**2),
    "idefics3": (tiny_idefics3, SMOLVLM_TOKENS, "idefics3-8b", 169),
}


@pytest.mark.parametrize("family", CASES)
def test_bench_runs_and_counted_flops_equal_the_formula(family):
    build, unit, _, _ = CASES[family]
    settings = BenchSettings(tokens=(8,), methods=("vispruner", "fastv"), repeats=1, warmup=0, text_tokens=8, new_tokens=2)
    model = build(text_layers=4)
    result = run_bench(model, settings, progress=False)
    assert result.meta["patches_per_crop"] == unit
    assert visual_tokens(model.config) == unit  # what the CLI reads from a config before loading
    full, *pruned = result.rows
    assert [row["num_tokens"] for row in pruned] == [8, 8] and result.meta["skipped"] == []
    text = model.config.text_config
    # FastV scores one query row, all heads, against the whole prompt's keys: 2 L H h beyond the formula.
    score_row = 2 * (8 + unit) * text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    for row in result.rows:
        analytic, counted = (round(row[f"llm_prefill_tflops_{kind}"] * 1e12) for kind in ("analytic", "counted"))
        assert counted - analytic == (score_row if row["method"] == "fastv" else 0), row
        assert row["llm_prefill_tflops_analytic"] <= full["llm_prefill_tflops_analytic"]


@pytest.mark.parametrize("family", CASES)
def test_preset_is_the_published_architecture(family):
    _, _, preset, tokens = CASES[family]
    config = PRESETS[preset].config()
    assert config.model_type == family
    assert visual_tokens(config, image_size=1024) == tokens  # image_size: for families whose count follows it


def test_gemma4_bench_counted_flops_equal_the_formula():
    """Gemma 4 (FastV refused): global layers with their own head size and key heads serving as
    values, as in the 31B checkpoint; the benchmark image is 16 x 16 tokens, as the preset's."""
    settings = BenchSettings(tokens=(8,), methods=("vispruner",), repeats=1, warmup=0, text_tokens=8, new_tokens=2)
    model = tiny_gemma4(text_layers=4, attention_k_eq_v=True, global_head_dim=16, num_global_key_value_heads=1)
    result = run_bench(model, settings, progress=False)
    assert result.meta["patches_per_crop"] == 256 == visual_tokens(model.config)
    full, pruned = result.rows
    assert full["visual_tokens"] == 256 and pruned["visual_tokens"] == 8 and result.meta["skipped"] == []
    for row in result.rows:
        assert round(row["llm_prefill_tflops_analytic"] * 1e12) == round(row["llm_prefill_tflops_counted"] * 1e12), row
    config = PRESETS["gemma-4-31b"].config()
    assert config.model_type == "gemma4" and visual_tokens(config) == 256
    assert visual_tokens(config, image_size=1008) == 21**2  # its own size: 1008 px, 63 patches, pooled 3 x 3
