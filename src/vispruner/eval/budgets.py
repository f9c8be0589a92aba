"""Token budgets as users write them: a count of visual tokens (``64``) or a share (``11%``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    given: str  # as the user wrote it
    num_tokens: int
    fraction: float  # num_tokens / the model's visual tokens per image
    share: float | None = None  # the share given (0.11 for "11%"), None for a count

    def apply_arguments(self) -> dict[str, Any]:
        """What :func:`vispruner.apply` takes for this budget: ``keep_ratio`` for a share, so that
        images of any size keep that share of their tokens, else ``num_tokens``."""
        return {"num_tokens": self.num_tokens} if self.share is None else {"keep_ratio": self.share}


def parse_budget(text: str, total: int) -> Budget:
    """``"25%"`` or ``"16"`` as a :class:`Budget` out of ``total`` visual tokens per image.

    A share counts as ``keep_ratio`` does (:func:`vispruner.apply`): rounded half up, at least 1;
    a count must lie in [1, total].
    """
    from vispruner.adapters.budget import ratio_tokens

    given = text.strip()
    share = None
    try:
        if given.endswith("%"):
            share = float(given[:-1]) / 100
            if not 0 < share <= 1:
                raise ValueError
            count = ratio_tokens(share, total)
        else:
            count = int(given)
            if not 1 <= count <= total:
                raise ValueError
    except ValueError:
        raise ValueError(
            f"tokens must be a count in [1, {total}] or a share in (0%, 100%], got {text!r}"
        ) from None
    return Budget(given, count, count / total, share)


def parse_budgets(spec: str, total: int) -> list[Budget]:
    """A comma-separated list of budgets (``"100%,50%,11%"``), in the order given."""
    parts = [p for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"tokens must list at least one budget, got {spec!r}")
    return [parse_budget(p, total) for p in parts]


#: Gemma 4: tokens per side of a square image at its processor's default budget (280 tokens):
#: 16 x 16 = 256, from 768 px on the checkpoints' 16 px patches pooled 3 x 3.
GEMMA4_SIDE_TOKENS = 16


def visual_tokens(model: Any, image_size: int | None = None) -> int:
    """Visual tokens per image (per crop, for anyres models) that the language model receives
    unpruned: the budget's unit. A Qwen-VL model sees one token per 2 x 2 patches of the image it
    is given, so it needs ``image_size`` (px, of a square image that its processor leaves as it is).

    ``model`` is the model or its config (so that a command can check budgets before loading it).
    """
    config = getattr(model, "config", model)
    vision = config.vision_config
    kernel = getattr(vision, "pooling_kernel_size", None)
    if kernel is not None:  # Gemma 4: images at their own size, k x k patches a token
        side = GEMMA4_SIDE_TOKENS if image_size is None else image_size // (vision.patch_size * kernel)
        return side**2
    if hasattr(vision, "spatial_merge_size"):
        if image_size is None:
            raise ValueError(f"image_size must be given for {config.model_type}: its visual tokens follow the image size")
        return (image_size // (vision.patch_size * vision.spatial_merge_size)) ** 2
    merge = getattr(config, "spatial_merge_size", None)
    if merge is not None:  # Mistral 3: images at their own size (up to the tower's), 2 x 2 patches a token
        size = square_side(vision.image_size) if image_size is None else image_size
        return (size // (square_side(vision.patch_size) * merge)) ** 2
    if hasattr(config, "mm_tokens_per_image"):  # Gemma 3: the patches pooled to this many tokens
        return config.mm_tokens_per_image
    side = square_side(vision.image_size) // square_side(vision.patch_size)
    if getattr(config, "downsample_ratio", None) is not None:  # InternVL: pixel shuffle, 2 x 2 patches a token
        return int(side * config.downsample_ratio) ** 2
    if getattr(config, "scale_factor", None) is not None:  # Idefics3 / SmolVLM: pixel shuffle, per tile
        return (side // config.scale_factor) ** 2
    patches = side**2
    # "full" keeps CLIP's [CLS] as a token; SigLIP has none.
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return patches + int(full and vision.model_type == "clip_vision_model")


def square_side(size: Any) -> int:
    """A square size given as an int or as (height, width) (InternViT's config)."""
    return int(size if isinstance(size, int) else size[0])
