"""Time ``vispruner.select`` against a plain step-by-step VisPruner loop, side by side, on a
quiet CPU and on a busy one.

The plain loop is the published algorithm written the obvious way: one image at a time, the
cosine similarity between the two halves recomputed at every step; it is what the speed-up is
measured against. Recomputing rounds the last bit of some similarities differently from the
library's once-computed matrix, which on random data can flip near-tied scores, so the masks
are checked against the same loop reading the float32 similarity computed once
(``residual_similarity``, the same arithmetic as the library): they must be identical.

``--load K`` then starts K busy single-threaded processes and times ``vispruner.select`` at the
default thread count against one thread (``torch.set_num_threads(1)``), side by side, as a user
running data loaders or servers beside it would see. ``--baseline REV`` also times the
selection of git revision REV (its methods/vispruner.py, _checks.py and base.py) side by side.

    python benchmarks/selection_speed.py [--batch 16 --tokens 576 --dim 1024 --keep 64 --ratio 0.5]
                                         [--load 2] [--baseline REV]
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
from typing import Callable

import torch
import torch.nn.functional as F

import vispruner
from vispruner.bench.timing import interleaved_medians
from vispruner.methods.vispruner import residual_similarity

Select = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def plain_loop(
    features: torch.Tensor, attention: torch.Tensor, num_tokens: int, ratio: float, once: bool = False
) -> torch.Tensor:
    """The published loop, one image at a time. ``once``: read the similarity computed once by
    the library's ``residual_similarity`` instead of recomputing it at every step."""
    batch, tokens, _ = features.shape
    masks = torch.zeros(batch, tokens, dtype=torch.bool)
    num_important = int(num_tokens * ratio)
    num_diverse = num_tokens - num_important
    for b in range(batch):
        order = attention[b].mean(0).argsort(descending=True)
        masks[b, order[:num_important]] = True
        residual = order[num_important:]
        listed = torch.arange(residual.numel())
        similarity = residual_similarity(features[b : b + 1], residual[None])[0] if once else None
        while listed.numel() > num_diverse:
            length = listed.numel()
            drop = min(8, length - num_diverse, (length + 1) // 2)
            side_a, side_b = listed[0::2], listed[1::2]
            if similarity is None:
                unit = F.normalize(features[b, residual[listed]].float(), dim=-1)
                closeness = (unit[0::2] @ unit[1::2].T).max(dim=1).values
            else:
                closeness = similarity[side_a][:, side_b].max(dim=1).values
            survivors = closeness.argsort(descending=True)[drop:]
            listed = torch.cat([side_a[survivors], side_b])
        masks[b, residual[listed]] = True
    return masks


def one_thread(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)

    return run


def baseline_select(revision: str) -> Select:
    """``select`` of the library at git ``revision``, imported beside the current one."""
    root = Path(__file__).resolve().parent.parent
    package = Path(tempfile.mkdtemp()) / "baseline_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("vispruner.py", "_checks.py", "base.py"):
        source = subprocess.run(
            ["git", "-C", str(root), "show", f"{revision}:src/vispruner/methods/{name}"],
            check=True, capture_output=True, text=True,
        ).stdout
        (package / name).write_text(source)
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("baseline_methods.vispruner").select


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--load", type=int, default=0, metavar="K",
                        help="also measure beside K busy single-threaded processes (default: 0, skip)")
    parser.add_argument("--baseline", metavar="REV", help="also time the selection of git revision REV")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, args.tokens, args.dim, generator=generator)
    attention = torch.rand(args.batch, args.heads, args.tokens, generator=generator).softmax(-1)
    problem = (features, attention, args.keep, args.ratio)

    selects: dict[str, Select] = {"vispruner.select": vispruner.select}
    if args.baseline:
        selects[f"select at {args.baseline}"] = baseline_select(args.baseline)
    expected = plain_loop(*problem, once=True)
    for name, select in selects.items():
        if not torch.equal(select(*problem), expected):
            raise SystemExit(f"masks differ between {name} and the plain loop on the once-computed similarity")

    print(f"B={args.batch} N={args.tokens} C={args.dim} T={args.keep} r={args.ratio} "
          f"threads={torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print("masks identical to the plain loop reading the float32 similarity computed once")
    calls = [lambda: plain_loop(*problem)] + [lambda s=s: s(*problem) for s in selects.values()]
    times = interleaved_medians(calls, args.repeats)
    print(f"quiet: plain step-by-step loop (similarity recomputed per step) {times[0] * 1e3:9.1f} ms")
    for name, seconds in zip(selects, times[1:]):
        print(f"quiet: {name:<32} {seconds * 1e3:9.1f} ms   {times[0] / seconds:6.1f}x faster than the loop")
    if args.load:
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
        try:
            time.sleep(1.0)
            calls = []
            for select in selects.values():
                calls += [lambda s=select: s(*problem), one_thread(lambda s=select: s(*problem))]
            times = interleaved_medians(calls, args.repeats)
        finally:
            for process in busy:
                process.kill()
        print(f"beside {args.load} busy processes (load average {os.getloadavg()[0]:.1f}):")
        for index, name in enumerate(selects):
            default, single = times[2 * index], times[2 * index + 1]
            print(f"loaded: {name:<31} {default * 1e3:9.1f} ms at {torch.get_num_threads()} threads, "
                  f"{single * 1e3:9.1f} ms at 1 thread: {default / single:5.2f}x")


if __name__ == "__main__":
    main()
