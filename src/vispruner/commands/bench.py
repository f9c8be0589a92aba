"""``vispruner bench``: FLOPs, latency, memory and KV cache of pruned vs full models."""

from __future__ import annotations

import argparse

from .arguments import PRESET_NAMES, UsageError, add_method_options, check_output, check_plot, integer_at_least, method_names, method_options

DTYPES = ("float32", "float16", "bfloat16")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, e.g. 576,64; got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, e.g. 576,64; got {text!r}")
    return values


def _label(args: argparse.Namespace, presets: dict) -> str:
    if args.preset is None:
        return args.model
    source = presets[args.preset].source
    return f"{args.preset} preset (architecture of {source})" if source else f"{args.preset} preset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local path or hub id of a LLaVA-1.5 / LLaVA-NeXT checkpoint")
    source.add_argument("--preset", help=f"architecture with random weights, no download: {', '.join(PRESET_NAMES)}")
    parser.add_argument("--tokens", type=_int_list, default=(576, 192, 128, 64, 32),
                        help="visual-token budgets per crop (default 576,192,128,64,32)")
    parser.add_argument("--methods", type=method_names, default=None,
                        help="comma-separated methods (default: every registered method; see `vispruner methods`)")
    add_method_options(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on cuda, float32 on cpu")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per batch, one image each (default 1)")
    parser.add_argument("--text-tokens", type=int, default=64, help="non-image prompt tokens (default 64)")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens generated to time decoding (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per row; medians are reported (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prefills before timing each row (default 1)")
    parser.add_argument("--layers", type=int, default=None,
                        help="cut the language model to its first N layers (the report says so)")
    parser.add_argument("--threads", type=integer_at_least(1), default=None,
                        help="CPU threads for torch (default: torch's choice); on a busy machine 1 avoids the "
                        "stalls of threads waiting for each other")
    parser.add_argument("--seed", type=int, default=0, help="seed of random weights and inputs (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write every row and the run's description as JSON")
    parser.add_argument("--plot", metavar="PATH.png", help="plot latency and FLOPs against tokens (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from vispruner.bench import (
        PRESETS,
        BenchSettings,
        build_preset,
        format_markdown,
        format_table,
        load_model,
        plot,
        run_bench,
        write_json,
    )
    from vispruner.bench.report import header
    from vispruner.methods import available_methods

    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}; got {args.preset!r}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    methods = args.methods or tuple(available_methods())
    options = method_options(args, methods)
    check_output(args.json, "--json")
    check_plot(args.plot)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "float32"))
    settings = BenchSettings(
        tokens=args.tokens,
        methods=methods,
        options=options.per_method,
        notes=tuple(options.notes),
        batch_size=args.batch_size,
        text_tokens=args.text_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        warmup=args.warmup,
        seed=args.seed,
    )
    try:
        settings.check()
        if args.preset is not None:
            model, full_layers = build_preset(args.preset, args.layers, dtype, args.seed, device)
        else:
            model, full_layers = load_model(args.model, args.layers, dtype)
    except (ValueError, OSError) as error:
        raise UsageError(str(error).splitlines()[0]) from None
    model.to(device)
    try:
        result = run_bench(
            model,
            settings,
            full_layers=full_layers,
            label=_label(args, PRESETS),
            random_weights=args.preset is not None,
            progress=not args.no_progress,
        )
    except TypeError as error:
        raise UsageError(str(error)) from None
    if args.markdown:
        print("\n".join(header(result) + ["", format_markdown(result)]))
    else:
        print(format_table(result))
    if args.json:
        write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 0
