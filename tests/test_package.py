"""Packaging: a light import, the console script, the registry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vispruner


def test_import_is_light():
    code = "import sys, vispruner; heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'PIL') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_viz_is_an_attribute_of_the_package_and_stays_light():
    # The package under test, not whichever copy is installed.
    env = {**os.environ, "PYTHONPATH": str(Path(vispruner.__file__).parents[1])}
    code = "import sys, vispruner; vispruner.viz.draw_selection; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_cli_parser_stays_light():
    """--help and one-line usage errors must not pay for importing torch."""
    env = {**os.environ, "PYTHONPATH": str(Path(vispruner.__file__).parents[1])}
    code = "import sys; from vispruner.cli import build_parser; build_parser(); print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "vispruner.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: vispruner" in out.stdout


def test_unknown_attribute():
    with pytest.raises(AttributeError):
        vispruner.no_such_thing  # noqa: B018


def test_registry_lists_vispruner_and_rejects_unknown_names():
    assert "vispruner" in vispruner.available_methods()
    with pytest.raises(ValueError, match="method must be one of .*vispruner"):
        vispruner.get_method("nope")
