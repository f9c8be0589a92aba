"""``vispruner eval``: accuracy of pruning methods at several budgets on held-out testbed questions."""

from __future__ import annotations

import argparse
from typing import Any

from vispruner.adapters.positions import POSITIONS

from .arguments import (
    add_method_options,
    budgets,
    check_model,
    check_output,
    check_plot,
    integer_at_least,
    method_names,
    method_options,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="testbed", help="'testbed' or 'testbed-qwen' (bundled) or a model path or hub id")
    parser.add_argument("--methods", type=method_names, default="vispruner,random",
                        help="comma-separated registered methods (default vispruner,random; see `vispruner methods`)")
    parser.add_argument(
        "--tokens",
        default="100%,50%,25%,11%,5%",
        help="comma-separated budgets per image: counts (64) or shares (11%%, passed as keep_ratio: that share of each image, rounded half up)",
    )
    add_method_options(parser)
    parser.add_argument(
        "--positions", choices=POSITIONS, default=None,
        help="how the language model numbers the kept tokens: renumbered (compacted, the default of "
        "vision-stage methods) or as in the unpruned prompt (original, fastv's only setting)",
    )
    parser.add_argument("--seed", type=int, default=0, help="picks the held-out questions and seeds random methods")
    parser.add_argument("--n", type=integer_at_least(1), default=1000, help="held-out questions (default 1000)")
    parser.add_argument("--batch-size", type=integer_at_least(1), default=64, help="questions per batch (default 64)")
    parser.add_argument(
        "--max-new-tokens", type=integer_at_least(1), default=1,
        help="tokens generated per answer; its first word is scored (1 for the testbed)",
    )
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", default=None, metavar="PATH.png", help="plot accuracy against budget (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json

    options = method_options(args, args.methods)
    if args.positions is not None:
        options.notes.extend(_send_positions(args.positions, args.methods, options.per_method))
    check_output(args.json, "--json")
    check_plot(args.plot)
    total = check_model(args.model, options.per_method)
    chosen = budgets(args.tokens, total)

    from vispruner.eval.runner import evaluate, plot
    from vispruner.testbed.model import load_model
    from vispruner.testbed.scenes import held_out

    for note in options.notes:
        print(f"note: {note}")
    model, processor = load_model(args.model)
    samples = held_out(args.n, seed=args.seed)
    full, rows = evaluate(
        model, processor, samples, args.methods, chosen, args.seed, args.batch_size,
        progress=not args.no_progress, max_new_tokens=args.max_new_tokens, options=options.per_method,
    )

    print(f"{args.model}: {args.n} held-out questions (seed {args.seed}), all {total} tokens: {100 * full.accuracy:.1f}%")
    print(f"{'method':12s} {'budget':>7s} {'tokens':>6s} {'accuracy':>9s} {'retained':>9s}")
    for row in rows:
        retained = "-" if row.retained is None else f"{100 * row.retained:.1f}%"
        print(f"{row.method:12s} {row.budget:>7s} {row.num_tokens:6d} {100 * row.accuracy:8.1f}% {retained:>9s}")
    kinds = list(full.by_type)
    print("\naccuracy (%) per question type")
    print(f"{'method':12s} {'budget':>7s} " + " ".join(f"{kind:>10s}" for kind in kinds))
    print(f"{'all tokens':12s} {'':>7s} " + " ".join(f"{100 * full.by_type[kind]:10.1f}" for kind in kinds))
    for row in rows:
        if row.fraction < 1:
            print(f"{row.method:12s} {row.budget:>7s} " + " ".join(f"{100 * row.by_type[kind]:10.1f}" for kind in kinds))
    if args.json:
        report = {
            "model": args.model,
            "n": args.n,
            "seed": args.seed,
            "visual_tokens": total,
            "full_accuracy": full.accuracy,
            "full_by_type": full.by_type,
            "options": options.per_method,
            "notes": options.notes,
            "rows": [row.as_dict() for row in rows],
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2, default=str)  # cdpruner's clip option: its path
    if args.plot:
        plot(rows, full.accuracy, args.plot, title=f"{args.model}, n={args.n}")
    return 0


def _send_positions(positions: str, methods: tuple[str, ...], per_method: dict[str, dict[str, Any]]) -> list[str]:
    """Add ``positions`` to the options of the methods that take it; notes for the others."""
    from vispruner.methods import get_method

    # FastV prunes inside the language model, whose layers before the cut hold original positions.
    fixed = [name for name in methods if get_method(name).stage == "llm"] if positions == "compacted" else []
    for name in methods:
        if name not in fixed:
            per_method[name]["positions"] = positions
    if not fixed:
        return []
    verb = "keeps" if len(fixed) == 1 else "keep"
    return [f"--positions compacted applies to the other methods; {', '.join(fixed)} {verb} original positions"]
