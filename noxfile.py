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
TRANSFORMERS = ["5.19.0", "5.20.2", "5.21.1", "5.22.2", "5.23.0", "5.24.0", "5.25.0"]
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
    session.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml=.nox/junit-{transformers}.xml",
        "tests/adapters", *session.posargs,
    )


@nox.session(python=False)
def table(session: nox.Session) -> None:
    """Print the version x family table (markdown) from the JUnit files the adapters sessions wrote."""
    import xml.etree.ElementTree as ElementTree
    from pathlib import Path

    from vispruner.adapters import FAMILIES

    results: dict[str, dict[str, list[str]]] = {}
    for version in TRANSFORMERS:
        path = Path(f".nox/junit-{version}.xml")
        if not path.exists():
            continue
        for case in ElementTree.parse(path).iter("testcase"):
            name = case.get("name", "")
            failed = case.find("failure") is not None or case.find("error") is not None
            status = "fail" if failed else "skip" if case.find("skipped") is not None else "pass"
            params = name[name.find("[") + 1 : -1].split("-") if "[" in name else []
            families = {_family(part, FAMILIES) for part in params} - {None} or {"shared"}
            for family in families:
                results.setdefault(family, {}).setdefault(version, []).append(status)
    versions = [v for v in TRANSFORMERS if Path(f".nox/junit-{v}.xml").exists()]
    lines = ["| family | " + " | ".join(versions) + " |", "| --- |" + " --- |" * len(versions)]
    for family in sorted(results, key=lambda f: (f == "shared", f)):
        cells = []
        for version in versions:
            runs = results[family].get(version)
            if runs is None:
                cells.append("n/a")
            elif "pass" not in runs:
                cells.append(f"skipped ({len(runs)})")
            elif "fail" in runs:
                cells.append(f"FAIL ({runs.count('fail')} of {len(runs)})")
            else:
                skipped = f", {runs.count('skip')} skipped" if "skip" in runs else ""
                cells.append(f"pass ({runs.count('pass')}{skipped})")
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    session.log("\n" + "\n".join(lines))


def _family(part: str, families) -> str | None:
    """The model type a test-id parameter names (``onevision_video`` -> ``llava_onevision``)."""
    if part in families:
        return part
    head = part.split("_")[0]
    return next((model_type for model_type in families if model_type.endswith("_" + head)), None)
