"""``vispruner bench`` end to end on the tiny presets, through the command line."""

from __future__ import annotations

import json
import re

import pytest

import vispruner
from vispruner.cli import main

ROW_KEYS = {
    "method", "num_tokens", "text_tokens", "prefill_ms", "decode_ms_per_token", "pruning_overhead_ms",
    "pruning_overhead_share", "llm_prefill_tflops_analytic", "llm_prefill_tflops_counted", "vision_tflops",
    "kv_cache_bytes", "peak_memory_bytes",
}


@pytest.mark.parametrize("preset,visual", [("tiny-llava", 64), ("tiny-llava-next", 336)])
def test_bench_writes_every_key_the_table_and_the_plot(tmp_path, capsys, preset, visual):
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--preset", preset, "--tokens", "64,16", "--text-tokens", "8", "--repeats", "1",
            "--new-tokens", "2", "--json", str(out), "--plot", str(picture), "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    # Every registered method by default; 64 is the unpruned model (64 patches per crop).
    methods = vispruner.available_methods()
    assert [(row["method"], row["num_tokens"]) for row in rows] == [("none", 64)] + [(m, 16) for m in methods]
    assert result["meta"]["skipped"] == []
    for row in rows:
        assert ROW_KEYS <= set(row)
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["peak_memory_bytes"] > 0
        # The time columns come from one prefill: its parts fit in it, and speedup is the ratio of two entries.
        assert row["vision_ms"] + row["llm_prefill_ms"] <= row["prefill_ms"]
        assert row["prefill_speedup"] == pytest.approx(rows[0]["prefill_ms"] / row["prefill_ms"])
    assert rows[0]["visual_tokens"] == visual
    for row in rows[1:]:
        assert row["kv_cache_bytes"] < rows[0]["kv_cache_bytes"]
        assert row["llm_prefill_tflops_counted"] < rows[0]["llm_prefill_tflops_counted"]
    assert result["meta"]["random_weights"] and not result["meta"]["reduced_depth"]
    assert picture.read_bytes().startswith(b"\x89PNG")
    table = capsys.readouterr().out
    assert "prefill ms" in table and all(method in table for method in methods)
    assert re.search(r"\n  speedup +prefill ms of none / prefill ms of the row\n", table)  # the legend under the table


def test_reduced_depth_is_said_plainly(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny-llava", "--layers", "1", "--tokens", "8", "--methods", "vispruner",
            "--repeats", "1", "--new-tokens", "2", "--json", str(out), "--markdown", "--no-progress"]
    assert main(argv) == 0
    meta = json.loads(out.read_text())["meta"]
    assert (meta["llm_layers"], meta["llm_layers_full"], meta["reduced_depth"]) == (1, 4, True)
    assert "cut to 1 of its 4 layers" in capsys.readouterr().out


def test_cdpruner_with_clip_is_timed_and_reported_by_its_path(tmp_path):
    from types import SimpleNamespace

    from tests.tiny_models import tiny_clip, tiny_clip_tokenizer
    from vispruner.bench.presets import PRESETS

    tower = SimpleNamespace(config=PRESETS["tiny-llava"].config())
    tiny_clip(tower).save_pretrained(tmp_path / "clip")
    tiny_clip_tokenizer().save_pretrained(tmp_path / "clip")
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny-llava", "--tokens", "8", "--methods", "cdpruner", "--clip", str(tmp_path / "clip"),
            "--repeats", "1", "--new-tokens", "2", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["skipped"] == [] and [row["method"] for row in result["rows"]] == ["none", "cdpruner"]
    assert result["meta"]["settings"]["options"] == {"cdpruner": {"clip": str(tmp_path / "clip")}}


def test_a_checkpoint_on_disk_loads_only_the_layers_asked_for(tmp_path):
    from vispruner.bench import build_preset

    model, _ = build_preset("tiny-llava")
    model.save_pretrained(tmp_path / "checkpoint")
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", str(tmp_path / "checkpoint"), "--layers", "3", "--tokens", "16", "--methods",
            "fastv", "--repeats", "1", "--new-tokens", "2", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert (result["meta"]["llm_layers"], result["meta"]["llm_layers_full"]) == (3, 4)
    assert not result["meta"]["random_weights"]
    fastv = result["rows"][1]
    assert fastv["method"] == "fastv" and len(fastv["llm_layer_tokens"]) == 3


def test_a_preset_can_be_built_with_a_smaller_vocabulary():
    # The vLLM throughput benchmark keeps a 7B Qwen preset within a CPU machine's memory this way.
    from vispruner.bench import build_preset

    model, full = build_preset("tiny-qwen2.5-vl", layers=1, vocab_size=40)
    assert full > 1 and model.config.text_config.num_hidden_layers == 1
    assert model.get_input_embeddings().weight.shape[0] == 40 and model.lm_head.weight.shape[0] == 40


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--preset", "tiny-llava", "--layers", "5"], r"layers must be an integer in \[1, 4\]"),
        (["--preset", "no-such"], "preset must be one of"),
        (["--preset", "tiny-llava", "--methods", "nope"], "method must be one of"),
        (["--preset", "tiny-llava", "--new-tokens", "1"], "new_tokens must be an integer >= 2"),
    ],
)
def test_bad_arguments_name_the_argument(argv, message, capsys):
    assert main(["bench", *argv, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("vispruner bench: ") and error.count("\n") == 1
    assert re.search(message, error)


def test_the_overhead_is_given_as_a_share_of_the_pruned_prefill_at_batch_one(tmp_path, capsys):
    # In serving, one request at a time: what the method costs in the prefill it shortens.
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny-llava", "--tokens", "16", "--methods", "vispruner", "--repeats", "1",
            "--new-tokens", "2", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    lines = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()]
    titles = next(cells for cells in lines if cells[0] == "method")
    assert len(rows) == 2
    for row in rows:
        assert row["batch_size"] == 1
        share = row["pruning_overhead_ms"] / row["prefill_ms"]
        assert row["pruning_overhead_share"] == pytest.approx(share)
        cells = next(cells for cells in lines if cells[0] == row["method"] and len(cells) == len(titles))
        assert cells[titles.index("% pruned prefill")] == f"{share:.2%}"
        assert cells[titles.index("% full prefill")] == f"{row['pruning_overhead_ms'] / rows[0]['prefill_ms']:.2%}"


def test_the_help_names_every_preset():
    from vispruner.bench.presets import PRESETS
    from vispruner.commands.bench import PRESET_NAMES

    assert PRESET_NAMES == tuple(PRESETS)
