"""Command-line mistakes: one line ``vispruner <command>: ...`` on stderr, exit status 2, no work."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vispruner
import vispruner.bench
import vispruner.eval.runner
import vispruner.testbed.model
from vispruner.bench.presets import PRESETS
from vispruner.cli import COMMANDS, build_parser, main
from vispruner.commands.arguments import METHOD_OPTIONS


@pytest.fixture
def no_work(monkeypatch):
    """Loading or building a model, or evaluating, fails the test: a mistake must stop before."""

    def work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(vispruner.testbed.model, "load_model", work)
    monkeypatch.setattr(vispruner.bench, "build_preset", work)
    monkeypatch.setattr(vispruner.bench, "load_model", work)
    monkeypatch.setattr(vispruner.eval.runner, "evaluate", work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def usage_error(argv, capsys) -> str:
    """Run ``vispruner argv``; assert exit status 2 and one line on stderr; return that line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (112, 112)).save(path)
    return path


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nope"], "vispruner: argument COMMAND: invalid choice: 'nope'"),
        (["eval", "--methods", "foo"], "vispruner eval: argument --methods: method must be one of "),
        (["eval", "--methods", " , "], "vispruner eval: argument --methods: expected one or more"),
        (["eval", "--tokens", "0%"], r"vispruner eval: --tokens must be a count in [1, 64] or a share in (0%, 100%]"),
        (["eval", "--tokens", "65"], "vispruner eval: --tokens must be a count in [1, 64]"),
        (["eval", "--n", "0"], "vispruner eval: argument --n: expected an integer >= 1; got '0'"),
        (["eval", "--batch-size", "x"], "vispruner eval: argument --batch-size: expected an integer >= 1"),
        (["eval", "--important-ratio", "1.5"], "vispruner eval: --important-ratio: important_ratio must be a number in [0, 1]"),
        (["eval", "--positions", "kept"], "vispruner eval: argument --positions: invalid choice: 'kept'"),
        (
            ["eval", "--methods", "random,fastervlm", "--important-ratio", "0.3"],
            "vispruner eval: --important-ratio is an option of vispruner; none of the methods asked for",
        ),
        (["eval", "--contextual-ratio", "2"], "vispruner eval: --contextual-ratio is an option of visionzip"),
        (["eval", "--clip", "/no/such/clip"], "vispruner eval: --clip is an option of cdpruner; none of the methods asked"),
        (
            ["eval", "--methods", "cdpruner", "--clip", "/no/such/clip"],
            "vispruner eval: --clip: clip: could not load a CLIP model and tokenizer from '/no/such/clip'",
        ),
        (["eval", "--json", "/no/such/folder/eval.json"], "vispruner eval: --json: folder '/no/such/folder' does not exist"),
        (["eval", "--model", "/no/such/model"], "vispruner eval: --model '/no/such/model': cannot read its config"),
        (
            ["eval", "--model", "testbed-qwen", "--positions", "compacted", "--methods", "vispruner"],
            "vispruner eval: --model 'testbed-qwen': Qwen2.5-VL keeps the 3D M-RoPE positions",
        ),
        (["demo", "--model", "testbed-qwn"], "vispruner demo: --model 'testbed-qwn': not a bundled testbed (testbed, testbed-qwen)"),
        (["demo", "--tokens", "100"], "vispruner demo: --tokens must be a count in [1, 64]"),
        (["demo", "--tokens", "8,16"], "vispruner demo: --tokens takes one budget"),
        (["demo", "--image", "missing.png", "--question", "what?"], "vispruner demo: --image: no such file 'missing.png'"),
        (["demo", "--method", "random", "--important-ratio", "0.3"], "vispruner demo: --important-ratio is an option of"),
        (["demo", "--method", "vispruner,random"], "vispruner demo: argument --method: expected one method name"),
        (["demo", "--out", "kept.txt"], "vispruner demo: --out: 'kept.txt' needs an image extension"),
        (["bench"], "vispruner bench: one of the arguments --model --preset is required"),
        (["bench", "--preset", "no-such"], "vispruner bench: --preset must be one of"),
        (["bench", "--preset", "tiny-llava", "--methods", "nope"], "vispruner bench: argument --methods: method must be"),
        (["bench", "--preset", "tiny-llava", "--threads", "0"], "vispruner bench: argument --threads: expected an integer >= 1"),
        (["bench", "--preset", "tiny-llava", "--new-tokens", "1"], "vispruner bench: new_tokens must be an integer >= 2"),
        (
            ["bench", "--preset", "tiny-llava", "--methods", "pooling", "--contextual-ratio", "0.2"],
            "vispruner bench: --contextual-ratio is an option of visionzip",
        ),
    ],
)
def test_mistakes_print_one_line_and_exit_2_before_any_work(argv, expected, capsys, no_work):
    assert usage_error(argv, capsys).startswith(expected)


def test_an_image_needs_a_question(picture, capsys, no_work):
    line = usage_error(["demo", "--image", str(picture)], capsys)
    assert line.startswith("vispruner demo: --question must be given with --image")


def test_a_file_that_is_no_image(tmp_path, capsys, no_work):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    line = usage_error(["demo", "--image", str(text), "--question", "what?"], capsys)
    assert line.startswith(f"vispruner demo: --image: cannot read '{text}' as an image")


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_plot_checks_for_matplotlib_first(command, monkeypatch, tmp_path, capsys, no_work):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    argv = [command, "--plot", str(tmp_path / "plot.png")] + (["--preset", "tiny-llava"] if command == "bench" else [])
    assert usage_error(argv, capsys) == f"vispruner {command}: --plot needs matplotlib: pip install 'vispruner[plot]'"


def test_an_option_some_methods_take_goes_to_those_and_the_output_says_so(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    original = vispruner.eval.runner.evaluate

    def spy(*args, **kwargs):
        calls.append(kwargs["options"])
        return original(*args, **kwargs)

    monkeypatch.setattr(vispruner.eval.runner, "evaluate", spy)
    argv = ["eval", "--methods", "vispruner,random", "--important-ratio", "0.25", "--tokens", "8", "--n", "2",
            "--no-progress"]
    assert main(argv) == 0
    assert calls == [{"vispruner": {"important_ratio": 0.25}, "random": {}}]
    assert "note: --important-ratio 0.25 applies to vispruner only (random does not take it)" in capsys.readouterr().out


def test_clip_is_loaded_once_and_goes_to_cdpruner_with_the_questions(testbed_clip, capsys, monkeypatch, tmp_path):
    from transformers import CLIPModel

    from vispruner.adapters.clip_joint import ClipJoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls, loads = [], []
    original, load = vispruner.eval.runner.evaluate, CLIPModel.from_pretrained.__func__
    seen = []

    def spy(*args, **kwargs):
        calls.append(kwargs["options"])
        return original(*args, **kwargs)

    def counted(cls, *args, **kwargs):
        loads.append(args[0])
        return load(cls, *args, **kwargs)

    def questions(model, texts):  # what answer() hands the clip option
        seen.append(list(texts))
        return instructions(model, texts)

    instructions = vispruner.instructions
    monkeypatch.setattr(vispruner.eval.runner, "evaluate", spy)
    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(counted))
    monkeypatch.setattr(vispruner, "instructions", questions)
    argv = ["eval", "--methods", "cdpruner,random", "--clip", testbed_clip, "--tokens", "8,4", "--n", "2", "--no-progress",
            "--json", str(tmp_path / "eval.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["options"]["cdpruner"] == {"clip": testbed_clip}
    assert loads == [testbed_clip]
    assert isinstance(calls[0]["cdpruner"]["clip"], ClipJoint) and calls[0]["random"] == {}
    assert f"note: --clip {testbed_clip} applies to cdpruner only (random does not take it)" in capsys.readouterr().out
    assert seen and all(len(texts) == 2 and all(texts) for texts in seen)


def test_python_dash_m_vispruner():
    # The package under test, not whichever copy is installed.
    env = {**os.environ, "PYTHONPATH": str(Path(vispruner.__file__).parents[1])}
    ok = subprocess.run([sys.executable, "-m", "vispruner", "--version"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("vispruner ")
    bad = subprocess.run([sys.executable, "-m", "vispruner", "nope"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.startswith("vispruner: argument COMMAND: invalid choice: 'nope'") and bad.stderr.count("\n") == 1


class WorkStarted(Exception):
    """Raised where a command's work would start: every check of its arguments has passed."""


@pytest.fixture
def stop_at_work(monkeypatch):
    """Commands check everything, then stop where the work starts: loading the testbed (eval,
    demo), or timing the model (bench, whose preset is built: ``--layers`` is checked there)."""

    def work(*args, **kwargs):
        raise WorkStarted

    monkeypatch.setattr(vispruner.testbed.model, "load_model", work)
    monkeypatch.setattr(vispruner.bench, "load_model", work)
    monkeypatch.setattr(vispruner.bench, "run_bench", work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # bench --threads sets it for the process


BENCH = ["bench", "--preset", "tiny-llava", "--device", "cpu"]
TINY_LLAVA_LAYERS = PRESETS["tiny-llava"].config().text_config.num_hidden_layers
ABOVE_1 = repr(math.nextafter(1.0, 2.0))  # the next float after 1
BELOW_0 = repr(math.nextafter(0.0, -1.0))  # the next float before 0
ABOVE_100_PERCENT = repr(math.nextafter(100.0, 200.0)) + "%"
#: Every option with a range: (the command line before it, option, values at the ends of the range,
#: values one step beyond them). Integers >= 1 have no highest value; a share's lowest is open.
RANGES = [
    (["eval"], "--n", ["1"], ["0"]),
    (["eval"], "--batch-size", ["1"], ["0"]),
    (["eval"], "--max-new-tokens", ["1"], ["0"]),
    (["eval"], "--tokens", ["1", "64", "100%"], ["0", "65", "0%", ABOVE_100_PERCENT]),
    (["eval", "--methods", "vispruner"], "--important-ratio", ["0", "1"], [BELOW_0, ABOVE_1]),
    (["eval", "--methods", "visionzip"], "--contextual-ratio", ["0", "1"], [BELOW_0, ABOVE_1]),
    (["demo"], "--tokens", ["1", "64", "100%"], ["0", "65", "0%", ABOVE_100_PERCENT]),
    (["demo"], "--important-ratio", ["0", "1"], [BELOW_0, ABOVE_1]),
    (["demo", "--method", "visionzip"], "--contextual-ratio", ["0", "1"], [BELOW_0, ABOVE_1]),
    (BENCH, "--tokens", ["1"], ["0"]),
    (BENCH, "--threads", ["1"], ["0"]),
    (BENCH, "--batch-size", ["1"], ["0"]),
    (BENCH, "--text-tokens", ["1"], ["0"]),
    (BENCH, "--new-tokens", ["2"], ["1"]),
    (BENCH, "--repeats", ["1"], ["0"]),
    (BENCH, "--warmup", ["0"], ["-1"]),
    (BENCH, "--layers", ["1", str(TINY_LLAVA_LAYERS)], ["0", str(TINY_LLAVA_LAYERS + 1)]),
    (BENCH + ["--methods", "vispruner"], "--important-ratio", ["0", "1"], [BELOW_0, ABOVE_1]),
    (BENCH + ["--methods", "visionzip"], "--contextual-ratio", ["0", "1"], [BELOW_0, ABOVE_1]),
]


def _cases(pick: int) -> list:
    return [
        pytest.param(before, option, value, id=f"{before[0]} {option} {value}")
        for before, option, *ends in RANGES
        for value in ends[pick]
    ]


def test_the_range_table_covers_every_ranged_option():
    assert ABOVE_1 != "1" and float(ABOVE_1) > 1 and float(BELOW_0) < 0 and float(ABOVE_100_PERCENT[:-1]) / 100 > 1
    ranged = {(before[0], option) for before, option, *_ in RANGES}
    # Every option whose type reads a bounded integer, and every numeric method option, for each command.
    for command in ("eval", "demo", "bench"):
        parser = argparse.ArgumentParser()
        importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
        for action in parser._actions:
            bounded = getattr(action.type, "__qualname__", "").startswith("integer_at_least")
            numeric = action.dest in METHOD_OPTIONS and METHOD_OPTIONS[action.dest][0] is not str  # not --clip's path
            if bounded or numeric or action.dest == "tokens":
                assert (command, action.option_strings[0]) in ranged, (command, action.option_strings)


@pytest.mark.parametrize(("before", "option", "value"), _cases(0))
def test_the_ends_of_each_range_pass_every_check(before, option, value, capsys, stop_at_work):
    with pytest.raises(WorkStarted):
        main([*before, f"{option}={value}"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("before", "option", "value"), _cases(1))
def test_one_step_beyond_a_range_is_one_line_and_exit_2(before, option, value, capsys, stop_at_work):
    line = usage_error([*before, f"{option}={value}"], capsys)
    assert line.startswith(f"vispruner {before[0]}: ")
    assert option in line or option[2:].replace("-", "_") in line, line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["eval", "--methods", "vispruner,random, vispruner"], ("vispruner", "random")),
        (["bench", "--preset", "tiny-llava", "--methods", "vispruner,vispruner"], ("vispruner",)),
    ],
)
def test_a_method_named_twice_runs_once(argv, expected):
    assert len(argv[-1].split(",")) > len(expected)  # the command line names a method twice
    dest = argv[-2].lstrip("-")
    assert getattr(build_parser().parse_args(argv), dest) == expected


def test_demo_takes_one_method_named_twice_as_one():
    assert build_parser().parse_args(["demo", "--method", "fastv,fastv"]).method == "fastv"


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--model", "testbed-qwen", "--methods", "cdpruner", "--clip", "some/clip"],
        ["demo", "--model", "testbed-qwen", "--method", "cdpruner", "--clip", "some/clip"],
        ["bench", "--preset", "qwen2.5-vl-7b", "--methods", "cdpruner", "--clip", "some/clip"],
    ],
)
def test_clip_on_a_family_without_a_clip_tower_is_refused_before_loading_clip(argv, capsys, no_work, monkeypatch):
    import vispruner.adapters.clip_joint as clip_joint

    def load(*args, **kwargs):
        raise AssertionError("the CLIP checkpoint was loaded before the family was checked")

    monkeypatch.setattr(clip_joint, "load_clip", load)
    line = usage_error(argv, capsys)
    assert "--clip is for LLaVA-1.5 and LLaVA-NeXT" in line and argv[2] in line, line
