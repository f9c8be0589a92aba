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
