"""Time ``vispruner.select`` against a plain step-by-step VisPruner loop, side by side.

The plain loop is the published algorithm written the obvious way: one image at a time, the
cosine similarity between the two halves recomputed at every step. Both must give identical
masks; the script checks that before it prints the ratio.

    python benchmarks/selection_speed.py [--batch 16 --tokens 576 --dim 1024 --keep 64 --ratio 0.5]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import vispruner
from vispruner.bench.timing import interleaved_medians


def plain_loop(features: torch.Tensor, attention: torch.Tensor, num_tokens: int, ratio: float) -> torch.Tensor:
    batch, tokens, _ = features.shape
    masks = torch.zeros(batch, tokens, dtype=torch.bool)
    num_important = int(num_tokens * ratio)
    num_diverse = num_tokens - num_important
    for b in range(batch):
        order = attention[b].mean(0).argsort(descending=True)
        masks[b, order[:num_important]] = True
        residual = order[num_important:]
        while residual.numel() > num_diverse:
            length = residual.numel()
            drop = min(8, length - num_diverse, (length + 1) // 2)
            unit = F.normalize(features[b, residual].float(), dim=-1)
            side_a, side_b = unit[0::2], unit[1::2]
            closeness = (side_a @ side_b.T).max(dim=1).values
            survivors = closeness.argsort(descending=True)[drop:]
            residual = torch.cat([residual[0::2][survivors], residual[1::2]])
        masks[b, residual] = True
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=576)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, args.tokens, args.dim, generator=generator)
    attention = torch.rand(args.batch, args.heads, args.tokens, generator=generator).softmax(-1)

    ours = vispruner.select(features, attention, args.keep, args.ratio)
    plain = plain_loop(features, attention, args.keep, args.ratio)
    if not torch.equal(ours, plain):
        raise SystemExit("masks differ between vispruner.select and the plain loop")

    t_plain, t_ours = interleaved_medians(
        lambda: plain_loop(features, attention, args.keep, args.ratio),
        lambda: vispruner.select(features, attention, args.keep, args.ratio),
        args.repeats,
    )
    print(f"B={args.batch} N={args.tokens} C={args.dim} T={args.keep} r={args.ratio} "
          f"threads={torch.get_num_threads()} (masks identical)")
    print(f"plain step-by-step loop : {t_plain * 1e3:8.1f} ms")
    print(f"vispruner.select        : {t_ours * 1e3:8.1f} ms")
    print(f"speed-up                : {t_plain / t_ours:8.1f}x")


if __name__ == "__main__":
    main()
