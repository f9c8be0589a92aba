"""Selection at serving shapes on a CUDA GPU (issue 24): each method eagerly, replayed from a CUDA
graph (``methods/_graphs.py``), with its loop in one Triton kernel (``methods/_triton.py``), and
both, against one float32 similarity matmul of the same tokens.

For each N (the shapes of ``selection_serving.py``: LLaVA-1.5 576 / C 1024 / T 64, SigLIP 729 /
1152 / 81, LLaVA-NeXT 2,880 / 1024 / 320, 8,192 / 1280 / 819) at B = 1, and at B = 16, N = 576:
the masks of the four paths are checked identical, then each call is timed with CUDA events
(median of ``--repeats``, calls interleaved), and counted two ways: the aten ops dispatched from
the host (``TorchDispatchMode``; for the eager path each op that is not a view is a kernel
launch) and the GPU kernels that ran (``torch.profiler``, CUDA activity; for a graph, the
kernels inside it, launched by the one graph launch).

    python benchmarks/selection_gpu.py [--tokens 576,729,2880,8192] [--repeats 50] [--triton-max R]
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile

from vispruner.bench.timing import dispatched_ops
from vispruner.methods import _graphs, _triton
from vispruner.methods.divprune import divprune_selection
from vispruner.methods.visionzip import visionzip_selection
from vispruner.methods.vispruner import select

SHAPES = {576: (1024, 64), 729: (1152, 81), 2880: (1024, 320), 8192: (1280, 819)}


def variant(function: Callable[[], Any], graphs: bool, triton: bool) -> Callable[[], Any]:
    """``function`` with CUDA graphs and the Triton kernels switched on or off."""

    def call() -> Any:
        saved = {name: os.environ.get(name) for name in ("VISPRUNER_CUDA_GRAPHS", "VISPRUNER_TRITON")}
        os.environ["VISPRUNER_CUDA_GRAPHS"] = "1" if graphs else "0"
        os.environ["VISPRUNER_TRITON"] = "1" if triton else "0"
        try:
            return function()
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    return call


#: The paths compared: (label, CUDA graphs, Triton kernels). The last is the default.
PATHS = (("eager", False, False), ("graph", True, False), ("triton", False, True), ("graph+triton", True, True))


def event_medians(functions: list[Callable[[], Any]], repeats: int) -> list[float]:
    """Median milliseconds of each function on the GPU clock, interleaved, after two warm-ups."""
    for fn in functions:
        fn()
        fn()
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for fn, bucket in zip(functions, times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            bucket.append(start.elapsed_time(end))
    return [statistics.median(bucket) for bucket in times]


def kernels(function: Callable[[], Any]) -> int:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="576,729,2880,8192")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--triton-max", type=int, default=None, metavar="R",
                        help="longest residual list VisPruner's kernel takes (default: the library's)")
    args = parser.parse_args()
    if args.triton_max is not None:
        _triton.MAX_RESIDUAL = args.triton_max
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    cases = [(1, int(n)) for n in args.tokens.split(",")] + [(16, 576)]
    lines = []
    for batch, tokens in cases:
        width, keep = SHAPES.get(tokens, (1024, max(1, tokens // 9)))
        generator = torch.Generator().manual_seed(tokens)
        f = torch.randn(batch, tokens, width, generator=generator).cuda()
        a = torch.rand(batch, 16, tokens, generator=generator).softmax(-1).cuda()
        k = torch.randn(batch, tokens, 16, 64, generator=generator).cuda()
        calls = {
            "vispruner": lambda: select(f, a, keep, 0.5),
            "divprune": lambda: divprune_selection(f, keep).keep,
            "visionzip": lambda: visionzip_selection(f, a, k, keep).keep,
        }
        for name, fn in calls.items():
            reference = variant(fn, False, False)()
            for label, graphs, triton in PATHS[1:]:
                if not torch.equal(variant(fn, graphs, triton)(), reference):
                    raise SystemExit(f"{name}: {label} and eager masks differ at B={batch}, N={tokens}")
        matmul = lambda: torch.matmul(f, f.transpose(1, 2))  # noqa: E731
        functions = [matmul]
        for name in ("vispruner", "divprune"):
            functions += [variant(calls[name], graphs, triton) for _, graphs, triton in PATHS]
        functions.append(calls["visionzip"])
        times = event_medians(functions, args.repeats)
        counts = {
            name: [(dispatched_ops(variant(fn, g, t)), kernels(variant(fn, g, t))) for _, g, t in PATHS]
            for name, fn in calls.items()
        }
        lines.append((batch, tokens, width, keep, times, counts))
        print(f"B={batch} N={tokens} done", flush=True)
    labels = [label for label, _, _ in PATHS]
    print("\nmasks: every path = eager for every method and shape")
    print("\nms on the GPU clock (selection / one float32 similarity matmul), median of", args.repeats)
    heads = [f"{name} {label}" for name in ("vispruner", "divprune") for label in labels] + ["visionzip"]
    print("\n| B | N | C | T | matmul | " + " | ".join(heads) + " |")
    print("| --- " * (5 + len(heads)) + "|")
    for batch, tokens, width, keep, (m, *rest), _ in lines:
        cells = [f"{t:.3f} ({t / m:.2f}x)" for t in rest]
        print(f"| {batch} | {tokens:,} | {width} | {keep} | {m:.3f} | " + " | ".join(cells) + " |")
    print("\nper call: host-dispatched aten ops / GPU kernels run (torch.profiler), paths", " -> ".join(labels))
    print("\n| B | N | vispruner | divprune | visionzip |")
    print("| --- | --- | --- | --- | --- |")
    for batch, tokens, _, _, _, counts in lines:
        cells = [" -> ".join(f"{ops:,} / {run:,}" for ops, run in paths) for paths in counts.values()]
        print(f"| {batch} | {tokens:,} | " + " | ".join(cells) + " |")
    print(f"\ngraphs captured: {len(_graphs._graphs)}")


if __name__ == "__main__":
    main()
