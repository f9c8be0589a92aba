"""``vispruner eval``: accuracy of pruning methods at several budgets on held-out testbed questions."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="testbed", help="'testbed' (bundled) or a model path or hub id")
    parser.add_argument("--methods", default="vispruner,random", help="comma-separated registered methods")
    parser.add_argument(
        "--tokens",
        default="100%,50%,25%,11%,5%",
        help="comma-separated budgets per image: counts (64) or shares of the model's visual tokens (11%%)",
    )
    parser.add_argument("--important-ratio", type=float, default=None, help="VisPruner's important share")
    parser.add_argument("--seed", type=int, default=0, help="picks the held-out questions and seeds random methods")
    parser.add_argument("--n", type=int, default=1000, help="held-out questions")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--max-new-tokens", type=int, default=1, help="tokens generated per answer; its first word is scored (1 for the testbed)"
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH.png", help="plot accuracy against budget (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    import json

    from vispruner.eval.budgets import parse_budgets, visual_tokens
    from vispruner.eval.runner import evaluate, plot
    from vispruner.methods import available_methods
    from vispruner.testbed.model import load_model
    from vispruner.testbed.scenes import held_out

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in available_methods()]
    if not methods or unknown:
        raise ValueError(f"methods must be among {', '.join(available_methods())}; got {args.methods!r}")
    for name in ("n", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(args, name)}")
    model, processor = load_model(args.model)
    total = visual_tokens(model)
    budgets = parse_budgets(args.tokens, total)
    options = {} if args.important_ratio is None else {"important_ratio": args.important_ratio}
    samples = held_out(args.n, seed=args.seed)
    full, rows = evaluate(
        model, processor, samples, methods, budgets, args.seed, args.batch_size, max_new_tokens=args.max_new_tokens, **options
    )

    print(f"{args.model}: {args.n} held-out questions (seed {args.seed}), all {total} tokens: {100 * full:.1f}%")
    print(f"{'method':12s} {'budget':>7s} {'tokens':>6s} {'accuracy':>9s} {'retained':>9s}")
    for row in rows:
        retained = "-" if row.retained is None else f"{100 * row.retained:.1f}%"
        print(f"{row.method:12s} {row.budget:>7s} {row.num_tokens:6d} {100 * row.accuracy:8.1f}% {retained:>9s}")
    if args.json:
        report = {
            "model": args.model,
            "n": args.n,
            "seed": args.seed,
            "visual_tokens": total,
            "full_accuracy": full,
            "rows": [row.as_dict() for row in rows],
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
    if args.plot:
        plot(rows, full, args.plot, title=f"{args.model}, n={args.n}")
    return 0
