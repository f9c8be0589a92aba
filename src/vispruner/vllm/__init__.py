"""vLLM plugin: serve LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision (images, videos), Qwen2.5-VL, Qwen3-VL and Gemma 3
(images) with pruned visual tokens.

vLLM loads :func:`register` (the ``vllm.general_plugins`` entry point) in each of its processes;
nothing here imports vLLM until then. Pruning is asked per engine through the HF config
overrides, and is off without them::

    LLM(model, hf_overrides={"vispruner": {"method": "vispruner", "num_tokens": 64}})
    vllm serve MODEL --hf-overrides '{"vispruner": {"method": "vispruner", "num_tokens": 64}}'

The options are :func:`vispruner.apply`'s, checked with its messages when the engine's model
config is built (before any weights load). docs/serving.md says what is supported and refused.
"""

from __future__ import annotations

from typing import Any

#: Architectures whose vLLM classes the plugin replaces by subclasses that prune when asked.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "vispruner.vllm.models:PrunableLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "vispruner.vllm.models:PrunableLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "vispruner.vllm.qwen:PrunableQwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "vispruner.vllm.qwen:PrunableQwen3VLForConditionalGeneration",
    "Gemma3ForConditionalGeneration": "vispruner.vllm.gemma3:PrunableGemma3ForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "vispruner.vllm.onevision:PrunableLlavaOnevisionForConditionalGeneration",
}
#: Attribute of vLLM's model registry marking that :func:`register` checks engines' overrides.
_CHECKED = "_vispruner_checks"


def register() -> None:
    """Register the pruning subclasses (by name: vLLM imports them lazily), the start-up check, and
    the CPU runner's pruning flag (:mod:`.runner`, inert for engines that do not prune)."""
    from vllm import ModelRegistry

    from . import runner

    runner.install()

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    if not getattr(ModelRegistry, _CHECKED, False):
        from ..adapters.patching import InstancePatch

        InstancePatch().wrap(ModelRegistry, "inspect_model_cls", _checked_inspect)
        setattr(ModelRegistry, _CHECKED, True)


def _checked_inspect(original: Any, architectures: Any, model_config: Any, *args: Any, **kwargs: Any) -> Any:
    """vLLM's model inspection, which every engine runs while building its model config, plus the
    check of a ``vispruner`` override: a bad option, or a family the plugin does not serve, stops
    the engine before it starts, with :func:`vispruner.apply`'s message."""
    from .settings import SERVED, requested, settings_for

    result = original(architectures, model_config, *args, **kwargs)
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is not None and requested(hf_config) is not None:
        settings_for(hf_config)
        architecture = result[1]
        if architecture not in ARCHITECTURES or getattr(model_config, "model_impl", "auto") == "transformers":
            raise TypeError(
                f"vispruner's vLLM plugin prunes {', '.join(SERVED.values())} with vLLM's own model classes; "
                f"got architecture {architecture!r} (model_impl={getattr(model_config, 'model_impl', None)!r})"
            )
    return result
