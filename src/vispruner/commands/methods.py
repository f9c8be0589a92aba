"""``vispruner methods``: the registered methods, their options and papers."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from vispruner.methods import available_methods, get_method

    for name in available_methods():
        method = get_method(name)
        options = ", ".join(method.options) or "-"
        print(f"{name:12s} {method.stage:6s} options: {options:30s} {method.summary} ({method.paper})")
    return 0
