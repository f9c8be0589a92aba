"""The one place where the plugin works around vLLM's model runners (tested on vLLM 0.32.0 only).

A Qwen-VL prompt pruned by the plugin holds K placeholders per image, and which K tokens (so
which 3D M-RoPE positions) is known only once the tower ran. vLLM's runners have a hook for
exactly this, made for its own video pruning (EVS): when ``is_multimodal_pruning_enabled``, the
media embeddings carry 4 trailing position columns out of ``embed_multimodal`` and the runner
calls the model's ``recompute_mrope_positions`` before the language model runs. vLLM ties the
hook to ``video_pruning_rate > 0``; the plugin switches it on for its own engines:

* GPU runners (V1 ``GPUModelRunner.load_model`` and V2's ``maybe_create_mm_pruner``) read
  ``multimodal_config.is_multimodal_pruning_enabled()`` after the model is built: the model
  patches that method of its own engine's config object (per instance, reversible).
* vLLM's CPU runner (``CPUModelRunner.load_model``) never sets the flag, so EVS cannot run on
  CPU at all. :func:`install` wraps that method once per process to set it as the GPU runner
  does; the wrapper acts only for a model that prunes with the plugin, and leaves every other
  engine as vLLM built it.

:func:`check` verifies at engine start-up that every piece still exists and still reads the
flag, and refuses with a message naming the version tested otherwise.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from ..adapters.patching import InstancePatch

#: The vLLM release whose runners this module was written and tested against.
TESTED = "0.32.0"
#: Marks the CPU runner's ``load_model`` once :func:`install` wrapped it.
_MARK = "_vispruner_sets_pruning_flag"


def _cpu_runner() -> Any:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    return CPUModelRunner


def install() -> None:
    """Wrap the CPU runner's ``load_model`` (once per process; nothing on other platforms)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        runner = _cpu_runner()
    except ImportError:
        return  # check() refuses pruning engines, naming what is missing
    if getattr(runner.load_model, _MARK, False):
        return
    InstancePatch().wrap(runner, "load_model", _load_model)
    setattr(runner.load_model, _MARK, True)


def _load_model(original: Callable[..., Any], runner: Any, *args: Any, **kwargs: Any) -> Any:
    result = original(runner, *args, **kwargs)
    model = runner.get_model()
    if getattr(model, "vispruner_settings", None) is not None:
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        mm_config = runner.model_config.multimodal_config
        # As GPUModelRunner.load_model does; true here because the model switched it on.
        runner.is_multimodal_pruning_enabled = bool(
            supports_multimodal_pruning(model) and mm_config is not None and mm_config.is_multimodal_pruning_enabled()
        )
    return result


def check() -> None:
    """``RuntimeError`` unless every runner piece the position hook needs is there."""
    import vllm
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    missing = []
    gather = getattr(GPUModelRunner, "_gather_mm_embeddings", None)
    if gather is None or not {"is_multimodal_pruning_enabled", "recompute_mrope_positions"} <= _names(gather):
        missing.append("GPUModelRunner._gather_mm_embeddings calling recompute_mrope_positions")
    if current_platform.is_cpu():
        try:
            loaded = getattr(_cpu_runner().load_model, _MARK, False)
        except ImportError:
            loaded = False
        if not loaded:
            missing.append("CPUModelRunner.load_model (wrapped when the plugin loads)")
    else:
        if "is_multimodal_pruning_enabled" not in _names(GPUModelRunner.load_model):
            missing.append("GPUModelRunner.load_model reading multimodal_config.is_multimodal_pruning_enabled()")
        try:
            from vllm.v1.worker.gpu.model_states.mm_pruning import maybe_create_mm_pruner
        except ImportError:
            missing.append("vllm.v1.worker.gpu.model_states.mm_pruning.maybe_create_mm_pruner")
        else:
            if "is_multimodal_pruning_enabled" not in _names(maybe_create_mm_pruner):
                missing.append("maybe_create_mm_pruner reading is_multimodal_pruning_enabled()")
    if missing:
        raise RuntimeError(
            f"vispruner's vLLM plugin keeps pruned Qwen-VL tokens at their M-RoPE positions through vLLM's "
            f"multimodal-pruning hook, as tested on vLLM {TESTED}; this vLLM ({vllm.__version__}) lacks: "
            + "; ".join(missing)
        )


def _names(function: Callable[..., Any]) -> set[str]:
    """The identifiers a function's source mentions (what it reads and calls)."""
    import re

    try:
        source = inspect.getsource(inspect.unwrap(function))
    except (OSError, TypeError):
        return set()
    return set(re.findall(r"[A-Za-z_]\w*", source))


def enable_position_hook(multimodal_config: Any) -> InstancePatch:
    """Make this engine's runner call ``recompute_mrope_positions`` (see the module doc)."""
    check()
    patch = InstancePatch()
    patch.wrap(multimodal_config, "is_multimodal_pruning_enabled", lambda original: True)
    return patch
