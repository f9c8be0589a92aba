"""The transformers compatibility matrix: ``python -m nox`` (``pip install nox`` first).

Each session is a fresh venv with one transformers release, the CPU torch and the test
dependencies, running the adapter reference tests (every family's pruned ``generate`` against
its hand-fed reference, FastV, the drift checks). ``python -m nox -s "adapters(transformers='5.19.0')"``
runs one release; docs/compatibility.md holds the last table. The releases are the newest patch
of every minor in the tested range (``vispruner.adapters.hf_seam.TESTED_RANGE``): keep the two
in step with pyproject.toml.
"""

import nox

#: Newest patch of every transformers minor in the tested range, oldest first.
TRANSFORMERS = ["5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0", "5.24.0"]
#: The CPU build: naming it keeps pip from pulling a CUDA torch on a machine without a GPU.
TORCH = "torch==2.13.0"

nox.options.sessions = ["adapters"]
nox.options.reuse_existing_virtualenvs = True


@nox.session(venv_backend="venv")
@nox.parametrize("transformers", TRANSFORMERS)
def adapters(session: nox.Session, transformers: str) -> None:
    """The adapter reference tests on one transformers release."""
    session.install(TORCH)
    session.install(".[test-core]", TORCH, f"transformers=={transformers}")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/adapters", *session.posargs)
