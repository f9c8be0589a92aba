"""Model families that :func:`vispruner.apply` can patch, looked up by ``config.model_type``.

One thin module per family describes what differs (crops per image, token packing); the shared
machinery is in :mod:`.vision_stage` (hooks and wrappers), :mod:`.sequence` (compaction) and
:mod:`.patching` (reversible per-instance wrapping).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vision_stage import Family

#: config.model_type -> module defining FAMILY.
FAMILIES = {
    "llava": "vispruner.adapters.llava",
    "llava_next": "vispruner.adapters.llava_next",
    "qwen2_vl": "vispruner.adapters.qwen2_vl",
    "qwen2_5_vl": "vispruner.adapters.qwen2_5_vl",
    "qwen3_vl": "vispruner.adapters.qwen3_vl",
    "qwen3_vl_moe": "vispruner.adapters.qwen3_vl",
    "qwen3_5": "vispruner.adapters.qwen3_5",
    "llava_onevision": "vispruner.adapters.llava_onevision",
    "gemma3": "vispruner.adapters.gemma3",
    "qwen3_5_moe": "vispruner.adapters.qwen3_5_moe",
    "glm4v": "vispruner.adapters.glm4v",
    "glm4v_moe": "vispruner.adapters.glm4v_moe",
    "internvl": "vispruner.adapters.internvl",
    "smolvlm": "vispruner.adapters.smolvlm",
    "idefics3": "vispruner.adapters.smolvlm",
    "mistral3": "vispruner.adapters.mistral3",
    "gemma4": "vispruner.adapters.gemma4",
}
SUPPORTED = (
    "LLaVA-1.5 (LlavaForConditionalGeneration), LLaVA-NeXT (LlavaNextForConditionalGeneration), "
    "Qwen2-VL (Qwen2VLForConditionalGeneration), Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), "
    "Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration), "
    "Qwen3.5 (Qwen3_5ForConditionalGeneration), "
    "LLaVA-OneVision (LlavaOnevisionForConditionalGeneration), Gemma 3 (Gemma3ForConditionalGeneration)"
    ", Qwen3.5-MoE (Qwen3_5MoeForConditionalGeneration), GLM-4.1V (Glm4vForConditionalGeneration), "
    "GLM-4.5V (Glm4vMoeForConditionalGeneration)"
    ", InternVL 3 / 3.5 (InternVLForConditionalGeneration)"
    ", SmolVLM / Idefics3 (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration)"
    ", Mistral 3 (Mistral3ForConditionalGeneration), Gemma 4 (Gemma4ForConditionalGeneration)"
)


def family_of_type(model_type: str) -> "Family":
    """The family of checkpoints whose ``config.model_type`` is ``model_type``, known before any
    weights load; ``TypeError`` listing the supported families otherwise."""
    module = FAMILIES.get(model_type)
    if module is None:
        raise TypeError(f"vispruner supports {SUPPORTED}; got a {model_type!r} model")
    return _load(module)


def family_for(model: object) -> "Family":
    """The family of ``model``; ``TypeError`` listing the supported families otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    module = FAMILIES.get(model_type)
    if module is not None:
        family = _load(module)
        if isinstance(model, family.model_class):
            return family
    raise TypeError(f"vispruner supports {SUPPORTED}; got {type(model).__name__}")


def _load(module: str) -> "Family":
    """A family module's FAMILY; a transformers release without the family's classes raises
    ``TypeError`` naming the releases vispruner was tested on (every family ships in all of them)."""
    try:
        return import_module(module).FAMILY
    except ImportError as error:
        from .hf_seam import TESTED_RANGE, installed_version

        raise TypeError(
            f"{module.rsplit('.', 1)[-1]} needs {TESTED_RANGE}; transformers {installed_version()} is installed "
            f"and lacks what it needs ({error})"
        ) from error
