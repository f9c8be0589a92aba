"""bench on Qwen-VL: the published presets' shapes, and the LM FLOPs formula against the counter."""

from __future__ import annotations

import pytest

from vispruner.bench import BenchSettings, build_preset, run_bench
from vispruner.bench.presets import PRESETS

TEXT = 12


@pytest.fixture(scope="module")
def rows():
    model, full = build_preset("tiny-qwen2.5-vl")
    settings = BenchSettings(
        tokens=(64, 16), methods=("vispruner", "fastv"), text_tokens=TEXT, new_tokens=2, repeats=1, warmup=0
    )
    return run_bench(model, settings, full_layers=full, progress=False).rows


def test_counted_equals_the_formula_but_for_fastvs_attention_row(rows):
    # 24 x 24 merged tokens per image; FastV scores one query row against the prompt in layer 1.
    config = PRESETS["tiny-qwen2.5-vl"].config().text_config
    score_row = 2 * (TEXT + 576) * config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    assert [(row["method"], row["num_tokens"]) for row in rows] == [
        ("none", 576), ("vispruner", 64), ("vispruner", 16), ("fastv", 64), ("fastv", 16)
    ]
    for row in rows:
        analytic, counted = (round(row[f"llm_prefill_tflops_{kind}"] * 1e12) for kind in ("analytic", "counted"))
        assert counted - analytic == (score_row if row["method"] == "fastv" else 0), row
        kept = TEXT + row["num_tokens"]
        expected = [TEXT + 576] * 2 + [kept] * 2 if row["method"] == "fastv" else [kept] * 4
        assert row["llm_layer_tokens"] == expected


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("qwen2.5-vl-7b", (1280, 32, 14, 3584, 28, 28, 4, 18944)),
        ("qwen3-vl-8b", (1152, 27, 16, 4096, 36, 32, 8, 12288)),
    ],
)
def test_published_presets_have_the_published_shapes(name, shapes):
    config = PRESETS[name].config()
    vision, text = config.vision_config, config.text_config
    assert (
        vision.hidden_size, vision.depth, vision.patch_size, text.hidden_size, text.num_hidden_layers,
        text.num_attention_heads, text.num_key_value_heads, text.intermediate_size,
    ) == shapes
