"""``vispruner demo`` and ``vispruner eval`` on the bundled testbed, offline, with tiny n."""

import json

import pytest
from PIL import Image

from vispruner.cli import main
from vispruner.eval.budgets import parse_budget, parse_budgets


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_budgets_are_counts_or_shares():
    assert [(b.num_tokens, b.fraction) for b in parse_budgets("100%,50%,11%,5%,7", 64)] == [
        (64, 1.0), (32, 0.5), (7, 7 / 64), (3, 3 / 64), (7, 7 / 64)
    ]
    assert parse_budget(" 1% ", 64).num_tokens == 1  # never below one token
    # A share reaches apply as keep_ratio (images of any size keep that share), a count as num_tokens.
    assert parse_budget("11%", 64).apply_arguments() == {"keep_ratio": 0.11}
    assert parse_budget("7", 64).apply_arguments() == {"num_tokens": 7}
    assert parse_budget("62.5%", 4).num_tokens == 3  # 2.5 rounds half up, as keep_ratio does
    for bad in ("0", "65", "0%", "101%", "x", "-3"):
        with pytest.raises(ValueError, match=r"tokens must be a count in \[1, 64\]"):
            parse_budget(bad, 64)
    with pytest.raises(ValueError, match="at least one budget"):
        parse_budgets(" , ", 64)


def test_demo_prints_both_answers_and_draws_the_kept_patches(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--tokens", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "all tokens" in text and "vispruner" in text
    assert "  64 visual tokens" in text and "   8 visual tokens" in text
    assert Image.open(out).size[0] >= 336


def test_eval_writes_rows_and_plot(tmp_path, capsys):
    report, picture = tmp_path / "eval.json", tmp_path / "eval.png"
    argv = ["eval", "--methods", "vispruner,random", "--tokens", "100%,8", "--n", "6", "--batch-size", "4"]
    assert main([*argv, "--json", str(report), "--plot", str(picture)]) == 0
    data = json.loads(report.read_text())
    assert data["visual_tokens"] == 64 and data["n"] == 6
    rows = data["rows"]
    assert [(r["method"], r["budget"], r["num_tokens"]) for r in rows] == [
        ("vispruner", "100%", 64), ("vispruner", "8", 8), ("random", "100%", 64), ("random", "8", 8)
    ]
    for row in rows:
        assert row["fraction"] == row["num_tokens"] / 64
        assert row["accuracy"] in {k / 6 for k in range(7)}
    # Keeping every token changes nothing, whichever method keeps them.
    assert rows[0]["accuracy"] == rows[2]["accuracy"] == data["full_accuracy"]
    assert picture.stat().st_size > 0
    assert "retained" in capsys.readouterr().out


def test_the_full_budget_runs_once_whatever_the_methods(monkeypatch):
    from vispruner.eval import runner

    runs = []
    original = runner.accuracy

    def counted(*args, **kwargs):
        runs.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "accuracy", counted)
    argv = ["eval", "--methods", "vispruner,random,fastv", "--tokens", "100%,64,8", "--n", "2", "--no-progress"]
    assert main(argv) == 0
    assert len(runs) == 1 + 3  # the unpruned run, then each method at 8 tokens


def test_eval_reports_accuracy_per_question_type(tmp_path):
    from collections import Counter

    from vispruner.testbed.scenes import held_out

    report = tmp_path / "eval.json"
    argv = ["eval", "--methods", "random", "--tokens", "100%,8", "--n", "12", "--no-progress", "--json", str(report)]
    assert main(argv) == 0
    data = json.loads(report.read_text())
    asked = Counter()
    for sample in held_out(12, seed=0):
        question = sample.question
        side = question.answer in ("left", "right", "top", "bottom")
        asked[("left/right" if question.answer in ("left", "right") else "top/bottom") if side else question.kind] += 1
    assert data["full_by_type"].keys() == asked.keys()
    for by_type, overall in [(data["full_by_type"], data["full_accuracy"])] + [(r["by_type"], r["accuracy"]) for r in data["rows"]]:
        assert by_type.keys() == asked.keys()
        assert sum(by_type[kind] * asked[kind] for kind in asked) == pytest.approx(12 * overall)


def test_eval_positions_go_to_apply(monkeypatch, capsys):
    import vispruner.api

    calls = []
    original = vispruner.api.apply

    def spy(model, *args, **kwargs):
        calls.append((kwargs["method"], kwargs.get("positions")))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(vispruner.api, "apply", spy)
    argv = ["eval", "--methods", "random,fastv", "--tokens", "8", "--n", "2", "--no-progress"]
    assert main([*argv, "--positions", "original"]) == 0
    assert calls == [("random", "original"), ("fastv", "original")]
    calls.clear()
    assert main([*argv, "--positions", "compacted"]) == 0
    assert calls == [("random", "compacted"), ("fastv", None)]
    assert "note: --positions compacted applies to the other methods; fastv keeps original positions" in capsys.readouterr().out
