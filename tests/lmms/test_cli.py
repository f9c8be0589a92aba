"""The real lmms-eval CLI, offline, on a local task of held-out testbed questions.

The CLI runs in a subprocess that imports this checkout's ``src`` and finds the plugin through the
``lmms_eval.models`` entry point that pyproject.toml declares (written to a temporary
``.dist-info``, so that the test needs no reinstall of the package under test).
"""

import json
import os
import subprocess
import re
import sys
from pathlib import Path

import pytest

from vispruner.cli import main
from vispruner.lmms.testbed_task import TASK, write_task

ROOT = Path(__file__).resolve().parents[2]
N = 60
TOKENS = 7


def declared_entry_points() -> dict[str, str]:
    """The ``[project.entry-points."lmms_eval.models"]`` table of pyproject.toml (no tomllib on 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split('[project.entry-points."lmms_eval.models"]\n', 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^(\S+) = "([^"]+)"$', table, re.MULTILINE))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    info = root / "plugin" / "vispruner_entry_points-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vispruner-entry-points\nVersion: 0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in declared_entry_points().items())
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{lines}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(root / "plugin")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    return write_task(root / "task", n=N, seed=0), root, env


def lmms_eval(command, workspace, name):
    task, root, env = workspace
    out = root / name
    args = ["--model", "vispruner", "--model_args", f"pretrained=testbed,method=vispruner,num_tokens={TOKENS}"]
    args += ["--tasks", TASK, "--include_path", str(task), "--batch_size", "16", "--output_path", str(out)]
    run = subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [results] = out.rglob("*results.json")
    return json.loads(results.read_text())["results"][TASK]["accuracy,none"]


@pytest.fixture(scope="module")
def eval_accuracy(tmp_path_factory):
    """``vispruner eval`` on the same held-out questions, at the same budget."""
    report = tmp_path_factory.mktemp("eval") / "eval.json"
    assert main(["eval", "--n", str(N), "--methods", "vispruner", "--tokens", str(TOKENS), "--json", str(report)]) == 0
    [row] = json.loads(report.read_text())["rows"]
    return row["accuracy"]


def test_pyproject_registers_the_plugin():
    from vispruner.lmms import MODEL_ID

    assert declared_entry_points() == {MODEL_ID: "vispruner.lmms:manifest"}


def test_two_cpu_processes_score_what_vispruner_eval_scores(workspace, eval_accuracy):
    """The real CLI under accelerate: the plugin found in every process, the questions sharded."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "-m", "lmms_eval"]
    assert lmms_eval(launch, workspace, "two") == pytest.approx(eval_accuracy, abs=1e-9)


@pytest.mark.slow  # lmms-eval's start-up alone costs about 25 s of CPU; CI runs the two-process case
def test_lmms_eval_command_in_one_process_scores_what_vispruner_eval_scores(workspace, eval_accuracy):
    console = Path(sys.executable).with_name("lmms-eval")
    assert lmms_eval([str(console)], workspace, "one") == pytest.approx(eval_accuracy, abs=1e-9)
