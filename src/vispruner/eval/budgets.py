"""Token budgets as users write them: a count of visual tokens (``64``) or a share (``11%``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    given: str  # as the user wrote it
    num_tokens: int
    fraction: float  # num_tokens / the model's visual tokens per image


def parse_budget(text: str, total: int) -> Budget:
    """``"25%"`` or ``"16"`` as a :class:`Budget` out of ``total`` visual tokens per image.

    A share rounds to the nearest count, at least 1; a count must lie in [1, total].
    """
    given = text.strip()
    try:
        if given.endswith("%"):
            share = float(given[:-1])
            if not 0 < share <= 100:
                raise ValueError
            count = max(1, round(total * share / 100))
        else:
            count = int(given)
            if not 1 <= count <= total:
                raise ValueError
    except ValueError:
        raise ValueError(
            f"tokens must be a count in [1, {total}] or a share in (0%, 100%], got {text!r}"
        ) from None
    return Budget(given, count, count / total)


def parse_budgets(spec: str, total: int) -> list[Budget]:
    """A comma-separated list of budgets (``"100%,50%,11%"``), in the order given."""
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"tokens must list at least one budget, got {spec!r}")
    return [parse_budget(p, total) for p in parts]


def visual_tokens(model: Any, image_size: int | None = None) -> int:
    """Visual tokens per image that the language model of a LLaVA-style or Qwen-VL model
    receives unpruned. A Qwen-VL model sees one token per 2 x 2 patches of the image it is
    given, so it needs ``image_size`` (px, of a square image that its processor leaves as it is).

    ``model`` is the model or its config (so that a command can check budgets before loading it).
    """
    config = getattr(model, "config", model)
    vision = config.vision_config
    if hasattr(vision, "spatial_merge_size"):
        if image_size is None:
            raise ValueError(f"image_size must be given for {config.model_type}: its visual tokens follow the image size")
        return (image_size // (vision.patch_size * vision.spatial_merge_size)) ** 2
    patches = (vision.image_size // vision.patch_size) ** 2
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return patches + int(full)
