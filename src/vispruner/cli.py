"""The ``vispruner`` command line. Each subcommand lives in its own module and loads on use."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn, Sequence

from vispruner.commands.arguments import UsageError

#: subcommand -> (module that defines ``add_arguments(parser)`` and ``run(args)``, help line)
COMMANDS: dict[str, tuple[str, str]] = {
    "methods": ("vispruner.commands.methods", "list the registered token-selection methods"),
    "bench": ("vispruner.commands.bench", "measure FLOPs, latency, memory and KV cache of pruned vs full models"),
    "demo": ("vispruner.commands.demo", "answer a question with all tokens and pruned, and draw the kept patches"),
    "eval": ("vispruner.commands.eval", "accuracy of methods at several token budgets on the bundled testbed"),
}


class _Parser(argparse.ArgumentParser):
    """Reports a mistake as one line, ``vispruner <command>: ...``, and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


def build_parser() -> argparse.ArgumentParser:
    from vispruner import __version__

    parser = _Parser(
        prog="vispruner",
        description="Training-free visual token pruning for vision-language models (VisPruner and peers).",
    )
    parser.add_argument("--version", action="version", version=f"vispruner {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_line) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_line, description=help_line)
        sub.set_defaults(_module=module)
        # Parsers are declared up front so that --help lists every option; the work loads lazily.
        importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; a user's mistake prints one line on stderr and returns 2, before any work."""
    parser = build_parser()
    prog = parser.prog
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        prog = f"{parser.prog} {args.command}"
        return int(importlib.import_module(args._module).run(args) or 0)
    except UsageError as error:
        message, where = (error.args + (prog,))[:2]
        print(f"{where}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
