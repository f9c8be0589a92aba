"""How ``vispruner.select`` scales with the number of tokens, against one similarity matmul.

For each N, one image: features (1, N, C) float32, attention (1, N), T = N // 10 tokens kept,
r = 0.5. The yardstick is one float32 similarity matmul of those tokens ((N x C) @ (C x N)),
timed alternately with the selection in the same process (medians), so that machine noise hits
both alike. Peak memory is the resident-set high-water mark during one selection, above what the
process held with its inputs in place (Linux: reset through /proc/self/clear_refs). Each N runs
in a fresh process.

    python benchmarks/selection_scaling.py [--tokens 576,1024,2048,4096,8192,16384 --dim 1280]

To measure another version of the library, run this script with that version's ``src`` first
on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(tokens: int, dim: int, ratio: float, repeats: int) -> str:
    import vispruner

    generator = torch.Generator().manual_seed(tokens)
    features = torch.randn(1, tokens, dim, generator=generator)
    attention = torch.rand(1, tokens, generator=generator)
    keep = max(1, tokens // 10)

    def matmul() -> None:
        torch.matmul(features, features.transpose(1, 2))

    def select() -> torch.Tensor:
        return vispruner.select(features, attention, keep, ratio)

    matmul()
    before = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    start = time.perf_counter()
    mask = select()
    first = time.perf_counter() - start
    peak_mib = (resident_kib("VmHWM") - before) / 1024
    assert int(mask.sum()) == keep

    matmul_times, select_times = [], [first]
    for index in range(repeats):
        start = time.perf_counter()
        matmul()
        matmul_times.append(time.perf_counter() - start)
        if index + 1 < repeats:
            start = time.perf_counter()
            select()
            select_times.append(time.perf_counter() - start)
    t_select, t_matmul = statistics.median(select_times), statistics.median(matmul_times)
    return (
        f"| {tokens} | {dim} | {keep} | {t_select * 1e3:.1f} | {t_matmul * 1e3:.1f} | "
        f"{t_select / t_matmul:.2f}x | {peak_mib:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="576,1024,2048,4096,8192,16384", help="comma-separated N")
    parser.add_argument("--dim", type=int, default=1280, help="C")
    parser.add_argument("--ratio", type=float, default=0.5, help="important_ratio r")
    parser.add_argument("--repeats", type=int, default=3, help="timings per N (medians)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(measure(args.one, args.dim, args.ratio, args.repeats), flush=True)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at start; T = N // 10, r = {args.ratio}")
    print("| N | C | T | select ms | one similarity matmul ms | ratio | select peak MiB above inputs |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for tokens in (int(n) for n in args.tokens.split(",")):
        command = [sys.executable, __file__, "--one", str(tokens), "--dim", str(args.dim),
                   "--ratio", str(args.ratio), "--repeats", str(args.repeats)]
        subprocess.run(command, check=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
