"""bench on Qwen3.5-MoE: the published preset's shapes, and the LM FLOPs formula (gated-delta-rule
layers, gated softmax layers, experts) against the counter."""

from __future__ import annotations

import pytest

from vispruner.bench import BenchSettings, build_preset, run_bench
from vispruner.bench.flops import llm_prefill_flops
from vispruner.bench.presets import PRESETS

TEXT = 12


@pytest.fixture(scope="module")
def rows():
    model, full = build_preset("tiny-qwen3.5-moe")
    settings = BenchSettings(tokens=(64, 16), methods=("vispruner",), text_tokens=TEXT, new_tokens=2, repeats=1, warmup=0)
    return run_bench(model, settings, full_layers=full, progress=False).rows


def test_counted_equals_the_formula(rows):
    assert [(row["method"], row["num_tokens"]) for row in rows] == [("none", 576), ("vispruner", 64), ("vispruner", 16)]
    for row in rows:
        analytic, counted = (round(row[f"llm_prefill_tflops_{kind}"] * 1e12) for kind in ("analytic", "counted"))
        assert counted == analytic, row
        assert row["llm_layer_tokens"] == [TEXT + row["num_tokens"]] * 4


def test_a_linear_attention_layer_by_hand():
    # Qwen3.5-35B-A3B's first layer on 100 tokens (one chunk of 64 padded to 128): d = 2048,
    # 16 key heads and 32 value heads of 128, conv width 4 over 2*16*128 + 32*128 = 8192 channels.
    config = PRESETS["qwen3.5-35b-a3b"].config().text_config
    n, d = 100, 2048
    projections = 2 * n * d * (2 * 16 * 128 + 3 * 32 * 128 + 2 * 32)
    conv = 2 * 8192 * (n + 3) * 4
    delta = 32 * 128 * (4 * 64 * 128 + 6 * 128 * 128 + 2 * 64 * 128 + 63 * 256)
    experts = 2 * n * d * 256 + 6 * n * 8 * d * 512 + 6 * n * d * 512 + 2 * n * d
    assert llm_prefill_flops(config, [n]) == projections + conv + delta + experts + 2 * d * 248320


def test_published_preset_has_the_published_shapes():
    config = PRESETS["qwen3.5-35b-a3b"].config()
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.depth, vision.patch_size, vision.out_hidden_size) == (1152, 27, 16, 2048)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (2048, 40, 16, 2)
    assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (256, 8, 512)
    assert text.layer_types.count("full_attention") == 10 and text.layer_types[3] == "full_attention"


def test_counting_leaves_the_parameters_as_they_were():
    # The FLOP count turns requires_grad off for its pass (transformers 5.25's Qwen3.5 passes
    # Parameters to module calls, which the counter cannot hook under inference_mode).
    model, full = build_preset("tiny-qwen3.5-moe")
    model.lm_head.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    settings = BenchSettings(tokens=(16,), methods=("vispruner",), text_tokens=TEXT, new_tokens=2, repeats=1, warmup=0)
    run_bench(model, settings, full_layers=full, progress=False)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert not all(before.values()) and any(before.values())
