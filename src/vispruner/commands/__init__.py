"""Subcommands of the ``vispruner`` command line, one module each (see :mod:`vispruner.cli`).

A module here defines ``add_arguments(parser)`` and ``run(args) -> int``, and imports heavy
packages inside ``run`` only, so that ``vispruner --help`` stays fast.
"""
