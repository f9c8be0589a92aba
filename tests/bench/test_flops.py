"""The LM prefill FLOPs formula agrees with torch's FLOP counter on the real forward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaModel

from vispruner.bench import BenchSettings, build_preset, llm_prefill_flops, run_bench
from vispruner.bench.flops import flop_counter

BUDGETS = (48, 32, 16, 8, 1)


TEXT = 12
LAYERS = 4  # the tiny preset's language model; FastV prunes before layer 2


@pytest.fixture(scope="module")
def rows():
    model, full = build_preset("tiny-llava")
    settings = BenchSettings(
        tokens=BUDGETS, methods=("vispruner", "fastv"), text_tokens=TEXT, new_tokens=2, repeats=1, warmup=0
    )
    return run_bench(model, settings, full_layers=full, progress=False).rows


def test_counted_equals_the_formula_but_for_fastvs_attention_row_at_every_budget(rows):
    assert [(row["method"], row["num_tokens"]) for row in rows] == [
        ("none", 64), *[("vispruner", t) for t in BUDGETS], *[("fastv", t) for t in BUDGETS]
    ]
    # FastV's hooks reuse layer K-1's projections and score one query, all heads, against the
    # whole prompt's keys: 2 L H h FLOPs beyond the formula, nothing else.
    config = build_config("tiny-llava").text_config
    score_row = 2 * (TEXT + 64) * config.num_attention_heads * config.head_dim
    for row in rows:
        analytic, counted = (round(row[f"llm_prefill_tflops_{kind}"] * 1e12) for kind in ("analytic", "counted"))
        assert counted - analytic == (score_row if row["method"] == "fastv" else 0), row


def test_language_model_layers_see_text_plus_the_budget(rows):
    for row in rows:
        kept = TEXT + row["num_tokens"]
        if row["method"] == "fastv":
            assert row["llm_layer_tokens"] == [TEXT + 64] * 2 + [kept] * (LAYERS - 2)
        else:
            assert row["llm_layer_tokens"] == [kept] * LAYERS


def test_flops_and_cache_shrink_with_the_budget(rows):
    for method in ("vispruner", "fastv"):
        chosen = [rows[0]] + [row for row in rows if row["method"] == method]
        for key in ("llm_prefill_tflops_counted", "kv_cache_bytes"):
            values = [row[key] for row in chosen]
            assert values == sorted(values, reverse=True) and values[-1] < values[0], (method, key)


def test_vision_flops_do_not_shrink_with_the_budget(rows):
    # Vision-stage pruning happens after the tower: its cost stays, plus the method's own work.
    full = rows[0]["vision_tflops"]
    for row in rows[1:]:
        assert full <= row["vision_tflops"] <= 1.1 * full


@settings(max_examples=15, deadline=None)
@given(
    heads=st.sampled_from([1, 2, 4]),
    kv_divisor=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8, 16]),
    intermediate=st.integers(8, 96),
    layers=st.integers(1, 3),
    tokens=st.integers(1, 80),
    batch=st.integers(1, 3),
)
def test_formula_equals_a_counted_llama_forward(heads, kv_divisor, head_dim, intermediate, layers, tokens, batch):
    """Any Llama shape (grouped-query attention included): the formula counts every matrix product."""
    kv_heads = max(1, heads // kv_divisor)
    config = LlamaConfig(
        hidden_size=heads * head_dim, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=50,
    )
    model = LlamaModel(config).eval()
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    ids = torch.randint(0, 50, (batch, tokens))
    with torch.no_grad(), flop_counter() as counter:
        hidden = model(input_ids=ids).last_hidden_state
        head(hidden[:, -1:])
    assert llm_prefill_flops(config, [tokens] * layers, batch) == counter.get_total_flops()


def test_formula_on_the_published_7b_shape():
    # Vicuna-7B, one layer at n = 640: projections 2n*4096*(4*4096), attention 4n^2*4096,
    # MLP 6n*4096*11008, plus the LM head 2*4096*32064 for the last position.
    config = build_config("llava-1.5-7b").text_config
    n = 640
    expected = 2 * n * 4096 * 16384 + 4 * n * n * 4096 + 6 * n * 4096 * 11008 + 2 * 4096 * 32064
    assert llm_prefill_flops(config, [n]) == expected


def build_config(name):
    from vispruner.bench.presets import PRESETS

    return PRESETS[name].config()
