"""What the commands share to read and check their arguments before any work starts.

A user's mistake raises :class:`UsageError`; :func:`vispruner.cli.main` prints it as one line,
``vispruner <command>: <message>``, on stderr and exits with status 2. Every check here runs
before a model is loaded, so a mistake never costs a run. Method names, method options and
output paths are read here and nowhere else; a new option of a method slots into
:data:`METHOD_OPTIONS`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


class UsageError(Exception):
    """A mistake in the command line, found before any work ran."""


#: Method options the commands take: option name -> (flag type, help). A command compares
#: several methods; an option given there goes to the methods that take it and the output says so.
METHOD_OPTIONS: dict[str, tuple[Callable[[str], Any], str]] = {
    "important_ratio": (float, "VisPruner's share of the kept tokens chosen by [CLS] attention (default 0.5)"),
    "contextual_ratio": (float, "VisionZip's share of the kept tokens that are merged contextual tokens (default 10/64)"),
    "clip": (str, "CDPruner on LLaVA / LLaVA-NeXT: the CLIP checkpoint (hub id or path) of the vision tower, for the "
             "authors' relevance in CLIP's joint space (docs/methods.md)"),
}


#: The names of ``vispruner.bench.presets.PRESETS``, written out: importing that module imports
#: torch, which ``--help`` and usage errors must not pay for (a test keeps the two equal).
PRESET_NAMES = (
    "llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "llava-onevision-7b",
    "gemma-3-4b", "glm-4.1v-9b", "glm-4.5v", "qwen3.5-35b-a3b", "internvl3-8b", "idefics3-8b",
    "mistral-small-3.1-24b", "gemma-4-31b", "tiny-llava", "tiny-qwen2.5-vl", "tiny-glm-4.5v", "tiny-qwen3.5-moe",
    "tiny-llava-next",
)
#: The bundled models and presets whose vision tower is CLIP's (LLaVA-1.5 / LLaVA-NeXT), the only
#: ones ``--clip`` serves; for the others it is refused before a CLIP checkpoint is loaded.
CLIP_TOWERS = ("testbed", "llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "tiny-llava", "tiny-llava-next")


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def add_method_options(parser: argparse.ArgumentParser) -> None:
    for option, (kind, help_line) in METHOD_OPTIONS.items():
        parser.add_argument(flag(option), type=kind, default=None, help=help_line)


def method_names(text: str) -> tuple[str, ...]:
    """``--methods`` as argparse's ``type``: registered names, comma-separated, each once."""
    from vispruner.methods import get_method

    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated method names; got {text!r}")
    for name in names:
        try:
            get_method(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def method_name(text: str) -> str:
    """``--method`` as argparse's ``type``: one registered name."""
    names = method_names(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"expected one method name; got {text!r}")
    return names[0]


def integer_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low``."""

    def read(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}")
        return value

    return read


@dataclass(frozen=True)
class MethodOptions:
    """The options for each method (``per_method[name]``) and what the user should be told."""

    per_method: dict[str, dict[str, Any]]
    notes: list[str]


def method_options(args: argparse.Namespace, methods: Sequence[str]) -> MethodOptions:
    """The :data:`METHOD_OPTIONS` given on the command line, sent to the ``methods`` that take them.

    An option that none of ``methods`` takes, or a value out of the option's range, is a
    :class:`UsageError`; an option that only some take gives a note that says which.
    """
    from vispruner.methods import available_methods, get_method

    per_method: dict[str, dict[str, Any]] = {name: {} for name in methods}
    notes = []
    for option in METHOD_OPTIONS:
        value = getattr(args, option, None)
        if value is None:
            continue
        named = getattr(args, "preset", None) or getattr(args, "model", None)
        if option == "clip" and (named == "testbed-qwen" or named in PRESET_NAMES) and named not in CLIP_TOWERS:
            raise UsageError(f"--clip is for LLaVA-1.5 and LLaVA-NeXT (a CLIP vision tower); {named} has none")
        takers = [name for name in methods if option in get_method(name).options]
        if not takers:
            owners = ", ".join(name for name in available_methods() if option in get_method(name).options)
            raise UsageError(f"{flag(option)} is an option of {owners}; none of the methods asked for ({', '.join(methods)}) takes it")
        given = value
        try:
            value = get_method(takers[0]).options[option](value, option)
        except ValueError as error:
            raise UsageError(f"{flag(option)}: {error}") from None
        for name in takers:
            per_method[name][option] = value
        if len(takers) < len(methods):
            others = [name for name in methods if name not in takers]
            verb = "does" if len(others) == 1 else "do"
            notes.append(
                f"{flag(option)} {given} applies to {', '.join(takers)} only ({', '.join(others)} {verb} not take it)"
            )
    return MethodOptions(per_method, notes)


def check_output(path: str | None, option: str) -> None:
    """``path`` (if given) can be written: its folder exists."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option}: {path!r} is a folder; give a file name")


def check_plot(path: str | None) -> None:
    """``--plot`` (if given) can be drawn: matplotlib imports and the file can be written."""
    if path is None:
        return
    check_output(path, "--plot")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'vispruner[plot]'") from None


def check_model(model: str, per_method: dict[str, dict[str, Any]]) -> int:
    """Visual tokens per image of ``model`` (a bundled testbed, a path or a hub id), from its
    config only, once its family is known to take each method of ``per_method`` with its options
    (what :func:`vispruner.apply` would refuse after the weights load is refused here)."""
    from transformers import AutoConfig

    from vispruner.adapters import family_of_type
    from vispruner.api import check_arguments

    from vispruner.eval.budgets import visual_tokens
    from vispruner.testbed.model import TESTBEDS, testbed_weights
    from vispruner.testbed.scenes import IMAGE_SIZE

    if model not in TESTBEDS and "/" not in model and not Path(model).exists():
        # A mistyped testbed name would otherwise be asked of the hub (and warn of the network).
        raise UsageError(
            f"--model {model!r}: not a bundled testbed ({', '.join(TESTBEDS)}), a local folder or a hub id (owner/name)"
        )
    if model in TESTBEDS and not (testbed_weights(model) / "config.json").is_file():
        raise UsageError(
            f"--model {model!r}: its weights are not installed; train them with "
            f"`python -m vispruner.testbed.train --arch {TESTBEDS[model]}`"
        )
    try:
        if model in TESTBEDS:
            config = AutoConfig.from_pretrained(testbed_weights(model))
            total = visual_tokens(config, image_size=IMAGE_SIZE)
        else:
            config = AutoConfig.from_pretrained(model)
            total = visual_tokens(config)
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"--model {model!r}: cannot read its config ({str(error).splitlines()[0]})") from None
    try:
        family = family_of_type(config.model_type)
        for method, options in per_method.items():
            check_arguments(method=method, family=family, **options)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--model {model!r}: {error}") from None
    return total


def budgets(text: str, total: int) -> list[Any]:
    """``--tokens`` as :class:`vispruner.eval.budgets.Budget` objects out of ``total`` visual tokens."""
    from vispruner.eval.budgets import parse_budgets

    try:
        return parse_budgets(text, total)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
