"""bench on GLM-4.1V / 4.5V: the published presets' shapes, and the LM FLOPs formula (experts
included) against the counter."""

from __future__ import annotations

import pytest

from vispruner.bench import BenchSettings, build_preset, run_bench
from vispruner.bench.flops import llm_prefill_flops
from vispruner.bench.presets import PRESETS

TEXT = 12


@pytest.fixture(scope="module")
def rows():
    model, full = build_preset("tiny-glm-4.5v")
    settings = BenchSettings(
        tokens=(64, 16), methods=("vispruner", "fastv"), text_tokens=TEXT, new_tokens=2, repeats=1, warmup=0
    )
    return run_bench(model, settings, full_layers=full, progress=False).rows


def test_counted_equals_the_formula_with_experts_but_for_fastvs_attention_row(rows):
    # The bench image: 24 x 24 merged tokens (672 px); FastV scores one query row against the prompt in layer 1.
    config = PRESETS["tiny-glm-4.5v"].config().text_config
    score_row = 2 * (TEXT + 576) * config.num_attention_heads * config.head_dim
    assert [(row["method"], row["num_tokens"]) for row in rows] == [
        ("none", 576), ("vispruner", 64), ("vispruner", 16), ("fastv", 64), ("fastv", 16)
    ]
    for row in rows:
        analytic, counted = (round(row[f"llm_prefill_tflops_{kind}"] * 1e12) for kind in ("analytic", "counted"))
        assert counted - analytic == (score_row if row["method"] == "fastv" else 0), row


def test_the_experts_term_is_what_separates_glm_4_5v_from_a_dense_model():
    # Layer 0 dense (MLP 10944 wide); layer 1 experts: router 2ndE, 8 of 128 experts of 1408,
    # one shared of 1408.
    config = PRESETS["glm-4.5v"].config().text_config
    n, d = 100, 4096
    attention = 2 * n * d * (2 * 96 * 128 + 2 * 8 * 128) + 4 * n * n * 96 * 128
    dense = attention + 6 * n * d * 10944
    experts = attention + 2 * n * d * 128 + 6 * n * 8 * d * 1408 + 6 * n * d * 1408
    head = 2 * d * 151552
    assert llm_prefill_flops(config, [n]) == dense + head
    assert llm_prefill_flops(config, [n, n]) == dense + experts + head


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("glm-4.1v-9b", (1536, 24, 14, 4096, 40, 32, 2, 13696)),
        ("glm-4.5v", (1536, 24, 14, 4096, 46, 96, 8, 10944)),
    ],
)
def test_published_presets_have_the_published_shapes(name, shapes):
    config = PRESETS[name].config()
    vision, text = config.vision_config, config.text_config
    assert (
        vision.hidden_size, vision.depth, vision.patch_size, text.hidden_size, text.num_hidden_layers,
        text.num_attention_heads, text.num_key_value_heads, text.intermediate_size,
    ) == shapes
