"""The benchmark: the unpruned model, then every (method, budget), measured side by side.

Each row is measured the same way, on the same inputs, in one process. After ``warmup``
untimed prefills, each of ``repeats`` repeats times one prefill (a forward over the whole
prompt: image encoding, selection, language-model prefill, the last position's logits) with
the stock modules' forwards (vision tower, projector, language model, LM head) and the method's
hooks inside them timed separately, then one greedy ``generate``. A pruned row's repeat first
times an unpruned prefill the same way, back to back, for the overhead. The time columns of a
row all come from one repeat, the one whose prefill took the median time, so that they agree:

* ``prefill_ms``: that prefill, whole; ``vision_ms`` (vision tower and projector) and
  ``llm_prefill_ms`` (language model and LM head) are parts of it, and the rest is the
  model's glue and the method's own work outside those forwards;
* ``pruning_overhead_ms``: the work the method adds: its hooks, its selection, the compaction
  of the sequence. The selection and the compaction run outside the stock forwards, so
  overhead = (time outside the stock forwards, pruned) - (the same in the unpruned prefill
  just before) + (time in the method's hooks). What pruning saves inside the stock forwards
  (a shorter language-model input) does not offset it; the model's own glue outside them
  (scattering image features into the prompt) does shrink with the kept tokens, a small
  saving that the figure nets out;
* ``prefill_speedup``: the unpruned row's ``prefill_ms`` / this row's, exactly the ratio of
  the two table entries;
* ``decode_ms_per_token``: median over the repeats of the mean decode step of a greedy
  ``generate`` of ``new_tokens`` tokens (steps read by a logits processor);
* FLOPs and the KV cache: one forward under a FLOP counter; peak memory: one ``generate``.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessorList, PreTrainedModel

import vispruner

from ..adapters.hf_seam import cache_of
from ..methods import check_options, get_method
from .flops import flop_counter, llm_prefill_flops, split_counts
from ..eval.budgets import visual_tokens
from .inputs import (
    default_image_size,
    image_inputs,
    is_next,
    placeholders_per_image,
    prompt_inputs,
)
from .memory import PeakMemory, kv_cache_bytes, resident_bytes
from .timing import DecodeClock, PrefillBreakdown, hook_keys, median

#: The unpruned model's row.
FULL = "none"
#: Each prompt's question for CDPruner's ``clip`` option (bench's prompts are random words).
BENCH_QUESTION = "What is shown in the image?"


@dataclass
class BenchSettings:
    """What to measure. Budgets at or above the patches per crop are the unpruned model."""

    tokens: tuple[int, ...] = (576, 192, 128, 64, 32)
    methods: tuple[str, ...] | None = None
    #: method -> its options (``vispruner.apply`` keywords); methods absent take their defaults.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: what the report should say about the options (e.g. which methods took one).
    notes: tuple[str, ...] = ()
    batch_size: int = 1
    text_tokens: int = 64
    new_tokens: int = 16
    repeats: int = 5
    warmup: int = 1
    seed: int = 0

    def check(self) -> None:
        for name, low in (("batch_size", 1), ("text_tokens", 1), ("new_tokens", 2), ("repeats", 1), ("warmup", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if not self.tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.tokens):
            raise ValueError(f"tokens must be one or more integers >= 1; got {self.tokens!r}")
        for name in self.methods or ():
            get_method(name)  # a ValueError listing the registered methods
        for name, options in self.options.items():
            check_options(get_method(name), options)


@dataclass
class BenchResult:
    """``meta`` describes the run (model, depth, device, settings); ``rows`` one dict per row."""

    meta: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": self.rows}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads > 1 else ''}"


def _parts(model: PreTrainedModel) -> dict[str, torch.nn.Module]:
    """The stock modules timed apart; Qwen-VL's merger runs inside its tower (``visual``)."""
    inner = getattr(model, "model", None)
    names = ("vision_tower", "multi_modal_projector", "language_model")
    if inner is not None and all(hasattr(inner, name) for name in ("visual", "language_model")):
        return {"vision_tower": inner.visual, "language_model": inner.language_model, "lm_head": model.lm_head}
    if inner is not None and all(hasattr(inner, name) for name in ("vision_model", "connector", "text_model")):
        # Idefics3 / SmolVLM name the same three parts otherwise.
        parts = (inner.vision_model, inner.connector, inner.text_model)
        return dict(zip(names, parts)) | {"lm_head": model.lm_head}
    if inner is not None and all(hasattr(inner, name) for name in ("vision_tower", "embed_vision", "language_model")):
        # Gemma 4's projector is its embedder.
        parts = (inner.vision_tower, inner.embed_vision, inner.language_model)
        return dict(zip(names, parts)) | {"lm_head": model.lm_head}
    if inner is None or not all(hasattr(inner, name) for name in names) or not hasattr(model, "lm_head"):
        raise TypeError(
            "bench supports models with a vision tower, a multimodal projector and a language model (LLaVA-1.5, "
            f"LLaVA-NeXT, LLaVA-OneVision, Gemma 3, Gemma 4, InternVL, Mistral 3, Idefics3) and Qwen-VL models; got {type(model).__name__}"
        )
    return {name: getattr(inner, name) for name in names} | {"lm_head": model.lm_head}


class _Bench:
    def __init__(self, model: PreTrainedModel, settings: BenchSettings, step: Callable[[], None]) -> None:
        self.model = model
        self.settings = settings
        self.step = step
        self.device = model.device
        self.parts = _parts(model)
        self.layers = self.parts["language_model"].layers
        images = image_inputs(model, settings.batch_size, default_image_size(model), settings.seed)
        self.visual_tokens = placeholders_per_image(model, images)
        self.inputs = prompt_inputs(model, images, self.visual_tokens, settings.text_tokens, settings.seed)
        #: The question CDPruner's clip option embeds with CLIP's text tower (the prompt's words
        #: are random: only the cost is measured).
        self.questions = [BENCH_QUESTION] * settings.batch_size
        self.resident = resident_bytes(*model.parameters(), *model.buffers(), *self.inputs.values())

    def prefill(self) -> Any:
        with vispruner.instructions(self.model, self.questions):
            return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def generate(self, clock: DecodeClock | None = None) -> Any:
        n = self.settings.new_tokens
        processors = LogitsProcessorList([clock] if clock else [])
        with vispruner.instructions(self.model, self.questions):
            return self.model.generate(
                **self.inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, logits_processor=processors
            )

    def count(self) -> dict[str, Any]:
        """One prefill under the FLOP counter: FLOPs, tokens per decoder layer, KV cache."""
        lengths: list[int] = []

        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            lengths.append(hidden.shape[1])

        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in self.layers]
        # The counter's module tracker hooks autograd on every module argument that requires grad;
        # from transformers 5.25 Qwen3.5's convolution passes its bias Parameter to a module call,
        # which under inference_mode has no autograd node (AssertionError in torch.autograd.graph).
        # Nothing here needs gradients, so the parameters stop asking for them while counting.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for parameter in trainable:
                parameter.requires_grad_(False)
            with flop_counter() as counter:
                output = self.prefill()
        finally:
            for parameter in trainable:
                parameter.requires_grad_(True)
            for handle in handles:
                handle.remove()
        llm_counted, other = split_counts(counter, self.model)
        text = self.model.config.text_config
        analytic = llm_prefill_flops(
            text, lengths, self.settings.batch_size, gated_mlp=_gated(self.layers[0].mlp)
        )
        return {
            "visual_tokens": lengths[0] - self.settings.text_tokens,
            "llm_layer_tokens": lengths,
            "llm_prefill_tflops_analytic": analytic / 1e12,
            "llm_prefill_tflops_counted": llm_counted / 1e12,
            "vision_tflops": other / 1e12,
            "kv_cache_bytes": kv_cache_bytes(cache_of(output)),
        }

    def measure(self, patch: Callable[[], Any] | None = None) -> dict[str, Any]:
        """One row on the model as it is now: unpruned, or pruned by ``patch()`` (already applied).

        The overhead of a pruned row compares each instrumented prefill with an unpruned one
        run just before it (``vispruner.remove``, then ``patch()`` again), so that drifts in the
        machine's speed cancel.
        """
        row = self.count()
        self.step()
        for _ in range(self.settings.warmup):
            self.prefill()
        repeats, decode = [], []
        for _ in range(self.settings.repeats):
            if patch is None:
                times = self._instrumented(None).ms
                overhead = 0.0
            else:
                vispruner.remove(self.model)
                unpruned = self._instrumented(None).ms
                before = hook_keys(self.model)
                patch()
                times = self._instrumented(before).ms
                overhead = times["outside"] + times["hooks"] - unpruned["outside"]
            repeats.append({**times, "overhead": overhead})
            clock = DecodeClock(self.device)
            self.generate(clock)
            decode.append(clock.ms_per_token())
            self.step()
        times = sorted(repeats, key=lambda repeat: repeat["total"])[(len(repeats) - 1) // 2]
        memory = PeakMemory(self.device, self.resident)
        with memory.measure():
            self.generate()
        self.step()
        row.update(
            prefill_ms=times["total"],
            vision_ms=times["vision_tower"] + times.get("multi_modal_projector", 0.0),
            llm_prefill_ms=times["language_model"] + times["lm_head"],
            pruning_overhead_ms=times["overhead"],
            decode_ms_per_token=median(decode),
            peak_memory_bytes=memory.peak_bytes,
        )
        return row

    def _instrumented(self, before: dict | None) -> PrefillBreakdown:
        breakdown = PrefillBreakdown(self.parts, self.device, before)
        with breakdown.measure():
            self.prefill()
        return breakdown


def run_bench(
    model: PreTrainedModel,
    settings: BenchSettings | None = None,
    *,
    full_layers: int | None = None,
    label: str = "",
    random_weights: bool = False,
    progress: bool = True,
) -> BenchResult:
    """Benchmark ``model`` unpruned and under every (method, budget) of ``settings``.

    Args:
        model: a LLaVA-1.5 or LLaVA-NeXT model, on the device and in the dtype to measure.
        settings: budgets, methods (None: every registered method) and run sizes.
        full_layers: the language model's depth before any ``--layers`` cut, for the report.
        label: the model's name for the report (preset or path).
        random_weights: say in the report that the weights are random (a preset).
        progress: show a progress bar on stderr.

    Returns:
        A :class:`BenchResult`; its rows are the unpruned model (method ``"none"``) first.
    """
    from tqdm.auto import tqdm

    settings = settings or BenchSettings()
    settings.check()
    methods = settings.methods if settings.methods is not None else tuple(vispruner.available_methods())
    model.eval()
    patches = visual_tokens(model, image_size=default_image_size(model)[0])
    budgets = sorted({t for t in settings.tokens if t < patches}, reverse=True)
    runs = 1 + len(methods) * len(budgets)
    with torch.inference_mode(), tqdm(total=runs * (settings.repeats + 2), desc="bench", unit="pass",
                                      disable=not progress) as bar:

        bench = _Bench(model, settings, lambda: bar.update(1))
        bar.set_postfix_str("unpruned")
        full = {"method": FULL, "num_tokens": patches, **bench.measure()}
        rows, skipped = [full], []
        for name in methods:
            for budget in budgets:
                bar.set_postfix_str(f"{name} {budget}")
                options = settings.options.get(name, {})
                patch = functools.partial(vispruner.apply, model, num_tokens=budget, method=name, **options)
                try:
                    patch()
                except (TypeError, ValueError, NotImplementedError) as error:
                    skipped.append(f"{name} at {budget} tokens: {error}")
                    bar.update(settings.repeats + 2)
                    continue
                try:
                    rows.append({"method": name, "num_tokens": budget, **bench.measure(patch)})
                finally:
                    vispruner.remove(model)
    for row in rows:
        _finish_row(row, full, settings)
    text = model.config.text_config
    layers = text.num_hidden_layers
    meta = {
        "model": label or type(model).__name__,
        "architecture": type(model).__name__,
        "random_weights": random_weights,
        "device": describe_device(bench.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "llm_layers": layers,
        "llm_layers_full": full_layers or layers,
        "reduced_depth": bool(full_layers and layers < full_layers),
        "image_size": list(default_image_size(model)),
        "crops_per_image": bench.inputs["pixel_values"].shape[1] if is_next(model) else 1,
        "patches_per_crop": patches,
        "visual_tokens_full": bench.visual_tokens,
        "settings": asdict(settings) | {"methods": list(methods)},
        "skipped": skipped,
    }
    return BenchResult(meta, rows)


def _finish_row(row: dict[str, Any], full: dict[str, Any], settings: BenchSettings) -> None:
    row.update(
        text_tokens=settings.text_tokens,
        batch_size=settings.batch_size,
        prefill_speedup=full["prefill_ms"] / row["prefill_ms"],
        pruning_overhead_share=row["pruning_overhead_ms"] / row["prefill_ms"],
        pruning_overhead_share_of_full=row["pruning_overhead_ms"] / full["prefill_ms"],
        llm_flops_ratio=full["llm_prefill_tflops_analytic"] / row["llm_prefill_tflops_analytic"],
    )


def _gated(mlp: Any) -> bool:
    """Whether a dense MLP has three matrices (gate, up, down; GLM fuses gate and up into one)."""
    return hasattr(mlp, "gate_proj") or hasattr(mlp, "gate_up_proj")
