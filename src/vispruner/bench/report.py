"""Reading a benchmark: a plain-text table, a JSON file, and a plot of latency and FLOPs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .runner import FULL, BenchResult

_MIB = 2**20

#: (header, row key, format, what it is) of the table's columns; the table prints the last below it.
_COLUMNS = (
    ("method", "method", "{}", "the pruning method; none = the unpruned model"),
    ("tokens", "num_tokens", "{}", "visual-token budget per crop"),
    ("to LM", "visual_tokens", "{}", "visual tokens entering the language model (fastv: its first layers see all)"),
    ("prefill ms", "prefill_ms", "{:.1f}", "one whole prefill, the repeat of median time"),
    ("speedup", "prefill_speedup", "{:.2f}x", "prefill ms of none / prefill ms of the row"),
    ("vision ms", "vision_ms", "{:.1f}", "of that prefill: vision tower + projector"),
    ("LM ms", "llm_prefill_ms", "{:.1f}", "of that prefill: language model + LM head (the rest is glue and selection)"),
    ("decode ms/tok", "decode_ms_per_token", "{:.1f}", "mean greedy decode step, median over the repeats"),
    ("overhead ms", "pruning_overhead_ms", "{:.1f}", "of that prefill: the method's own work (selection, hooks, compaction)"),
    ("% full prefill", "pruning_overhead_share_of_full", "{:.2%}", "overhead ms / prefill ms of none"),
    ("% pruned prefill", "pruning_overhead_share", "{:.2%}", "overhead ms / prefill ms of the row: what the method costs in the prefill it shortens"),
    ("LM TFLOPs", "llm_prefill_tflops_analytic", "{:.4g}", "language-model prefill FLOPs by formula"),
    ("counted", "llm_prefill_tflops_counted", "{:.4g}", "the same, counted by torch.utils.flop_counter"),
    ("vision TFLOPs", "vision_tflops", "{:.4g}", "counted FLOPs outside the language model"),
    ("KV MiB", "kv_cache_bytes", "mib", "KV cache after the prefill"),
    ("peak MiB", "peak_memory_bytes", "mib", "peak tensor memory of one generate, weights included"),
)


def header(result: BenchResult) -> list[str]:
    """What was measured, on what, and the caveats that the figures carry."""
    meta = result.meta
    settings = meta["settings"]
    lines = [
        f"model: {meta['model']} ({meta['architecture']}), {meta['dtype']}, on {meta['device']}",
        f"input: batch {settings['batch_size']}, {settings['text_tokens']} text tokens, one "
        f"{meta['image_size'][0]}x{meta['image_size'][1]} image per prompt = {meta['crops_per_image']} crop(s) "
        f"of {meta['patches_per_crop']} patches, {meta['visual_tokens_full']} visual tokens unpruned; "
        f"{settings['new_tokens']} new tokens; medians of {settings['repeats']} repeats",
    ]
    if meta.get("random_weights"):
        lines.append("weights: random (the preset's architecture; costs do not depend on weight values)")
    if meta["reduced_depth"]:
        lines.append(
            f"NOTE: the language model is cut to {meta['llm_layers']} of its {meta['llm_layers_full']} layers "
            f"(--layers {meta['llm_layers']}): times, LM FLOPs, KV cache and memory are for that reduced model, "
            "not the full one."
        )
    lines += [f"note: {note}" for note in settings.get("notes", ())]
    lines += [f"skipped: {note}" for note in meta["skipped"]]
    return lines


def legend() -> list[str]:
    """What each column is (docs/benchmarks.md has the details)."""
    width = max(len(title) for title, *_ in _COLUMNS)
    return ["columns:"] + [f"  {title:<{width}}  {meaning}" for title, _, _, meaning in _COLUMNS]


def format_table(result: BenchResult) -> str:
    """The rows as an aligned plain-text table, under :func:`header`."""
    cells = [[title for title, *_ in _COLUMNS]]
    for row in result.rows:
        cells.append([_cell(row[key], form) for _, key, form, _ in _COLUMNS])
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(header(result) + [""] + lines + [""] + legend())


def format_markdown(result: BenchResult) -> str:
    """The rows as a Markdown table (for docs)."""
    titles = [title for title, *_ in _COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + " --- |" * len(titles)]
    for row in result.rows:
        lines.append("| " + " | ".join(_cell(row[key], form) for _, key, form, _ in _COLUMNS) + " |")
    return "\n".join(lines)


def _cell(value: Any, form: str) -> str:
    if form == "mib":
        return f"{value / _MIB:.1f}"
    return form.format(value)


def write_json(result: BenchResult, path: str | Path) -> None:
    # default=str: an option that holds a model (cdpruner's clip) is reported as its path.
    Path(path).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")


def plot(result: BenchResult, path: str | Path) -> None:
    """Prefill latency and LM prefill FLOPs against the token budget, one line per method.

    Needs matplotlib (``pip install "vispruner[plot]"``). Every line starts at the unpruned model.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('plotting needs matplotlib: pip install "vispruner[plot]"') from error

    full = next(row for row in result.rows if row["method"] == FULL)
    methods = sorted({row["method"] for row in result.rows} - {FULL})
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("prefill_ms", "prefill latency (ms)"), ("llm_prefill_tflops_analytic", "LM prefill TFLOPs (formula)"))
    for axis, (key, label) in zip(axes, panels):
        for method in methods or [FULL]:
            rows = [full] + sorted(
                (row for row in result.rows if row["method"] == method), key=lambda row: -row["num_tokens"]
            )
            axis.plot([row["num_tokens"] for row in rows], [row[key] for row in rows], marker="o", label=method)
        axis.set_xscale("log", base=2)
        ticks = sorted({row["num_tokens"] for row in result.rows})
        axis.set_xticks(ticks, [str(tick) for tick in ticks])
        axis.minorticks_off()
        axis.set_xlabel("visual tokens kept per crop")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[0].legend()
    meta = result.meta
    depth = f", LM cut to {meta['llm_layers']}/{meta['llm_layers_full']} layers" if meta["reduced_depth"] else ""
    figure.suptitle(f"{meta['model']}, {meta['dtype']}, {meta['device']}{depth}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
