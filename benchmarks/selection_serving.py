"""Selection at serving shapes (issue 24): one image (B = 1), the selection against one float32
similarity matmul of the same tokens, and the ops each call dispatches; the library now and at a
git revision (``--baseline``, default ``main``), side by side in one process.

For each N (LLaVA-1.5: 576 tokens, C = 1024, T = 64; SigLIP: 729, C = 1152, T = 81; LLaVA-NeXT:
2,880, C = 1024, T = 320; high resolution: 8,192, C = 1280, T = 819), features (1, N, C) and
per-head attention (1, 16, N), r = 0.5. Times are medians of interleaved repeats
(``interleaved_medians``: matmul, then each selection, in turn), so machine noise hits all alike;
the ratio is selection / matmul. Ops: aten ops dispatched during one call (``TorchDispatchMode``,
views included; off the CPU each op that is not a view is a kernel launch), plus calls into the
native library (ctypes, invisible to the dispatcher), counted by wrapping them. Masks of the two
versions are checked identical first. DivPrune and VisionZip are measured the same way.

``--load K`` repeats the timings beside K busy single-threaded processes.

    python benchmarks/selection_serving.py [--tokens 576,729,2880,8192] [--baseline main]
                                           [--repeats 7] [--load 2]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

import vispruner.methods as current
from vispruner.bench.timing import dispatched_ops, interleaved_medians
from vispruner.methods import _native

SHAPES = {576: (1024, 64), 729: (1152, 81), 2880: (1024, 320), 8192: (1280, 819)}


def baseline_methods(revision: str) -> ModuleType:
    """``vispruner.methods`` of git ``revision``, imported beside the current one."""
    root = Path(__file__).resolve().parent.parent
    package = Path(tempfile.mkdtemp()) / "baseline_methods"
    package.mkdir()
    listing = subprocess.run(
        ["git", "-C", str(root), "ls-tree", "--name-only", f"{revision}:src/vispruner/methods"],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    for name in listing:
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{revision}:src/vispruner/methods/{name}"],
            check=True, capture_output=True,
        ).stdout
        (package / name).write_bytes(source)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("baseline_methods")


class NativeCalls:
    """Counts calls into the native library made through ``_native``'s wrappers."""

    def __init__(self) -> None:
        self.count = 0
        for name in ("remove_duplicates", "greedy_max_min"):
            setattr(_native, name, self._counted(getattr(_native, name)))

    def _counted(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any) -> Any:
            self.count += 1
            return function(*args)

        return counted


def problem(tokens: int) -> dict[str, Any]:
    dim, keep = SHAPES.get(tokens, (1024, max(1, tokens // 9)))
    generator = torch.Generator().manual_seed(tokens)
    features = torch.randn(1, tokens, dim, generator=generator)
    attention = torch.rand(1, 16, tokens, generator=generator).softmax(-1)
    keys = torch.randn(1, tokens, 16, 64, generator=generator)
    return {"features": features, "attention": attention, "keys": keys, "keep": keep}


def calls(methods: ModuleType, p: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    f, a, k, t = p["features"], p["attention"], p["keys"], p["keep"]
    vispruner, divprune, visionzip = (
        importlib.import_module(f"{methods.__name__}.{name}") for name in ("vispruner", "divprune", "visionzip")
    )
    return {
        "vispruner": lambda: vispruner.select(f, a, t, 0.5),
        "divprune": lambda: divprune.divprune_selection(f, t).keep,
        "visionzip": lambda: visionzip.visionzip_selection(f, a, k, t).keep,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="576,729,2880,8192", help="comma-separated N")
    parser.add_argument("--baseline", default="main", metavar="REV", help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--load", type=int, default=0, metavar="K", help="also time beside K busy processes")
    args = parser.parse_args()

    old = baseline_methods(args.baseline)
    native = NativeCalls()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native loops "
          f"{'built' if _native.library() is not None else 'NOT available (eager path)'}, "
          f"load average {os.getloadavg()[0]:.1f}; baseline {args.baseline}")
    rows = []
    for tokens in (int(n) for n in args.tokens.split(",")):
        p = problem(tokens)
        new_calls, old_calls = calls(current, p), calls(old, p)
        for name in new_calls:
            if not torch.equal(new_calls[name](), old_calls[name]()):
                raise SystemExit(f"{name} masks differ from {args.baseline} at N={tokens}")
        ops = {}
        for name in new_calls:
            native.count = 0
            dispatched = dispatched_ops(new_calls[name])
            ops[name] = (dispatched_ops(old_calls[name]), dispatched, native.count)
        features = p["features"]
        functions = [lambda: torch.matmul(features, features.transpose(1, 2))]
        for name in ("vispruner", "divprune"):
            functions += [old_calls[name], new_calls[name]]
        timings = {"quiet": interleaved_medians(functions, args.repeats)}
        if args.load:
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
            try:
                time.sleep(1.0)
                timings[f"beside {args.load} busy"] = interleaved_medians(functions, args.repeats)
            finally:
                for process in busy:
                    process.kill()
        rows.append((tokens, p, ops, timings))
        print(f"N={tokens} done, load average {os.getloadavg()[0]:.1f}", flush=True)

    print("\nmasks identical to the baseline at every N, for every method")
    print("\n| N | C | T | ops per call: vispruner old / new | divprune old / new | visionzip old / new |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens, p, ops, _ in rows:
        cells = [f"{o:,} / {n} + {c} native" for o, n, c in ops.values()]
        print(f"| {tokens:,} | {p['features'].shape[2]} | {p['keep']} | " + " | ".join(cells) + " |")
    for condition in rows[0][3]:
        print(f"\n{condition}: ms (selection / one similarity matmul)\n")
        print("| N | matmul | vispruner old | vispruner new | divprune old | divprune new |")
        print("| --- | --- | --- | --- | --- | --- |")
        for tokens, _, _, timings in rows:
            matmul, *rest = timings[condition]
            cells = [f"{t * 1e3:.1f} ({t / matmul:.2f}x)" for t in rest]
            print(f"| {tokens:,} | {matmul * 1e3:.1f} | " + " | ".join(cells) + " |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
