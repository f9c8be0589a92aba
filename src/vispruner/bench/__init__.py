"""``vispruner bench``: FLOPs, latency, memory and KV cache of pruned vs full models.

Typical use::

    from vispruner.bench import BenchSettings, build_preset, run_bench, format_table

    model, full_layers = build_preset("llava-1.5-7b", layers=2, dtype=torch.bfloat16)
    result = run_bench(model, BenchSettings(tokens=(576, 64), methods=("vispruner",)),
                       full_layers=full_layers, label="llava-1.5-7b", random_weights=True)
    print(format_table(result))
"""

from .flops import llm_prefill_flops
from .presets import PRESETS, build_preset, load_model
from .report import format_markdown, format_table, plot, write_json
from .runner import BenchResult, BenchSettings, run_bench

__all__ = [
    "PRESETS",
    "BenchResult",
    "BenchSettings",
    "build_preset",
    "format_markdown",
    "format_table",
    "llm_prefill_flops",
    "load_model",
    "plot",
    "run_bench",
    "write_json",
]
