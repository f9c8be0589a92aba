"""What ``hf_overrides={"vispruner": {...}}`` asks of an engine, checked as :func:`vispruner.apply` checks it.

Pure Python and the library's own checks: no vLLM import, so the checks are testable anywhere.
"""

from __future__ import annotations

from typing import Any

from ..adapters.vision_stage import Settings

#: The HF config attribute that ``hf_overrides={"vispruner": {...}}`` sets.
KEY = "vispruner"
#: config.model_type -> the family the plugin serves (the library's name for it).
SERVED = {
    "llava": "LLaVA-1.5 (LlavaForConditionalGeneration)",
    "llava_next": "LLaVA-NeXT (LlavaNextForConditionalGeneration)",
    "qwen2_5_vl": "Qwen2.5-VL images (Qwen2_5_VLForConditionalGeneration)",
    "qwen3_vl": "Qwen3-VL images (Qwen3VLForConditionalGeneration)",
    "gemma3": "Gemma 3 images (Gemma3ForConditionalGeneration)",
    "llava_onevision": "LLaVA-OneVision images and videos (LlavaOnevisionForConditionalGeneration)",
}
#: The served families whose language model numbers the prompt 0, 1, 2, ... (1D positions).
RENUMBERED_FAMILIES = ("llava", "llava_next", "gemma3", "llava_onevision")


def requested(hf_config: Any) -> dict[str, Any] | None:
    """The ``vispruner`` override of ``hf_config`` (None: pruning not asked)."""
    return getattr(hf_config, KEY, None)


def settings_for(hf_config: Any) -> Settings | None:
    """The checked settings asked by ``hf_config``'s ``vispruner`` override, or None if absent.

    ``ValueError``/``TypeError`` with :func:`vispruner.apply`'s message for a bad option, for a
    family the plugin does not serve, and for what vLLM cannot run (FastV, original positions).
    """
    asked = requested(hf_config)
    if asked is None:
        return None
    if not isinstance(asked, dict):
        raise ValueError(
            f'hf_overrides["{KEY}"] must be a dict of vispruner.apply options, e.g. '
            f'{{"method": "vispruner", "num_tokens": 64}}; got {asked!r}'
        )
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SERVED:
        raise TypeError(
            f"vispruner's vLLM plugin prunes {', '.join(SERVED.values())}; got a {model_type!r} model "
            f'(leave hf_overrides["{KEY}"] unset to serve it unpruned)'
        )
    _check_tower(hf_config, model_type)
    from ..adapters import family_of_type
    from ..api import check_arguments

    settings = check_arguments(**asked, family=family_of_type(model_type))
    if settings.method.stage != "vision":
        raise ValueError(
            f"method {settings.method.name!r} prunes inside the language model, between its layers; vLLM's "
            "model runner gives a plugin no way in there (its attention kernels and KV cache are vLLM's). "
            "Choose a vision-stage method: " + ", ".join(vision_methods())
        )
    if "text" in settings.method.needs:
        raise ValueError(
            f"method {settings.method.name!r} selects by each image's instruction, which vLLM's embed_multimodal "
            "never sees (it gets the images alone, before the prompt is assembled). Choose one of: "
            + ", ".join(vision_methods())
        )
    if model_type in RENUMBERED_FAMILIES and settings.positions != "compacted":
        raise ValueError(
            f"positions={settings.positions!r} is not supported in vLLM for {SERVED[model_type]}: vLLM numbers the "
            "prompt tokens 0, 1, 2, ... itself; leave positions unset (compacted)"
        )
    if model_type == "llava_onevision" and "grid" in settings.method.needs and settings.budget == "per_image":
        raise ValueError(
            f"method {settings.method.name!r} needs one patch grid per budget unit; with budget='per_image' a "
            "LLaVA-OneVision image's base crop and its packed grid differ in width (vLLM's memory profiling sends such "
            "an image at start-up); use budget='per_crop'"
        )
    return settings


#: The LLaVA-style families' towers as the plugin reads them: (tower model_type, the
#: vision_feature_select_strategy, the vision_aspect_ratio or None for any, the tower in words).
_CLIP = ("clip_vision_model", "default", None, "a CLIP vision tower whose features come from one layer with [CLS] dropped")
TOWERS = {
    "llava": _CLIP,
    "llava_next": _CLIP,
    "llava_onevision": (
        "siglip_vision_model",
        "full",
        "anyres_max_9",
        "a LLaVA-OneVision with a SigLIP tower whose features come from one layer, packed anyres_max_9 (what vLLM "
        "packs with, whatever the config says)",
    ),
}


def _check_tower(hf_config: Any, model_type: str) -> None:
    if model_type not in TOWERS:
        return
    tower, strategy, aspect, described = TOWERS[model_type]
    got = (
        getattr(getattr(hf_config, "vision_config", None), "model_type", None),
        getattr(hf_config, "vision_feature_layer", None),
        getattr(hf_config, "vision_feature_select_strategy", None),
        getattr(hf_config, "vision_aspect_ratio", None),
    )
    if got[0] != tower or not isinstance(got[1], int) or got[2] != strategy or aspect not in (None, got[3]):
        shown = got if aspect is not None else got[:3]
        raise TypeError(
            f"vispruner's vLLM plugin needs {described} (vision_feature_layer an int, vision_feature_select_strategy="
            f"{strategy!r}); got a {shown[0]!r} tower, " + ", ".join(repr(value) for value in shown[1:])
        )


def vision_methods() -> list[str]:
    from ..methods import available_methods, get_method

    return [
        name for name in available_methods() if get_method(name).stage == "vision" and "text" not in get_method(name).needs
    ]
