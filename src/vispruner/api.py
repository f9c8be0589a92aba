"""Plug-and-play pruning for Hugging Face models: ``apply``, ``remove``, ``pruned``, ``last_selection``,
``instructions``."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TypeVar

if TYPE_CHECKING:
    from .adapters.vision_stage import Family, ImageSelection, Settings

Model = TypeVar("Model")

#: The default of ``important_ratio``; other values go only to methods that take the option.
DEFAULT_IMPORTANT_RATIO = 0.5
#: Tokens kept per budget unit when neither ``num_tokens`` nor ``keep_ratio`` is given.
DEFAULT_NUM_TOKENS = 64


def apply(
    model: Model,
    num_tokens: int | None = None,
    important_ratio: float = DEFAULT_IMPORTANT_RATIO,
    method: str = "vispruner",
    *,
    budget: str = "per_crop",
    keep_ratio: float | None = None,
    positions: str | None = None,
    **options: Any,
) -> Model:
    """Prune the visual tokens of ``model`` (this instance only) and return it.

    Args:
        model: a ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
            ``LlavaOnevisionForConditionalGeneration``, ``Gemma3ForConditionalGeneration``,
            ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``, ... (the
            ``TypeError`` for any other lists them; docs/models.md says what each supports).
        num_tokens: visual tokens kept per crop (``budget="per_crop"``) or per image
            (``"per_image"``); LLaVA-1.5 has one crop per image. At least the number of patches
            (576 at 336 px) reproduces the unpatched model exactly. Default 64 unless
            ``keep_ratio`` is given.
        keep_ratio: instead of ``num_tokens``, a share in (0, 1] of each budget unit's tokens
            (a crop, an image, a temporal group of a video; see ``budget``): ``ratio * tokens``
            rounded half up, at least 1. Giving both is a ``ValueError``.
        important_ratio: share of ``num_tokens`` chosen by [CLS] attention, for methods that take
            it (VisPruner); any other method raises ``ValueError`` for a value other than 0.5.
        method: a registered method (``vispruner methods`` lists them).
        budget: ``"per_crop"`` or ``"per_image"``. LLaVA-NeXT: ``"per_crop"`` (the authors'
            setting) gives ``num_tokens`` to the base image and to each high-resolution crop,
            ``"per_image"`` spends it over the whole image. Qwen-VL video: ``"per_crop"`` prunes
            each temporal group of frames to its share of the video's ``num_tokens`` (split
            evenly, the first groups one more when it does not divide, at least one each),
            ``"per_image"`` spends it over the whole video. Both mean the same for one-piece
            images (LLaVA-1.5, Qwen-VL).
        positions: how the language model numbers the tokens that remain. ``"compacted"``
            (the default of vision-stage methods, as in the papers): renumbered 0, 1, 2, ... as
            if the short sequence had been the prompt. ``"original"`` (FastV's only setting, its
            default): each kept token keeps the position it has in the unpruned prompt, and
            decoding continues after the unpruned length. Qwen-VL models take ``"original"``
            only (their default): kept tokens keep their 3D M-RoPE positions.
        **options: the method's own options, each checked against its range in ``Method.options``.
            ``method="cdpruner"`` takes ``clip``: the CLIP model of a LLaVA or LLaVA-NeXT vision
            tower (a ``transformers.CLIPModel``, a ``(CLIPModel, tokenizer)`` pair, or a
            checkpoint id or path, loaded once in float32), for the authors' relevance in CLIP's
            joint space; the questions then come from :func:`instructions`.

    Vision-stage methods prune before the language model. ``method="fastv"`` prunes inside it:
    decoder layers before ``layer`` (option, default 2) see every image token, the later ones
    see ``num_tokens`` per crop or image (plus LLaVA-NeXT's newline tokens), and so does the
    KV cache they fill; its ``forward`` returns logits for the kept tokens only.

    Tested on the transformers releases of :data:`vispruner.adapters.hf_seam.TESTED_RANGE`; on
    another release it warns once (``RuntimeWarning``), and an argument of ``generate``/``forward``
    that concerns the cache, masks or positions and that it does not know raises
    ``NotImplementedError`` rather than answering wrong.

    Applying again replaces the earlier patch; :func:`remove` undoes it. Raises ``TypeError`` for
    an unsupported model and ``ValueError`` for a bad argument.
    """
    from .adapters import family_for
    from .adapters.hf_seam import check_release, warn_if_untested
    from .adapters.vision_stage import VisionStagePruner

    warn_if_untested()
    family = family_for(model)
    settings = check_arguments(
        num_tokens, important_ratio, method, budget=budget, keep_ratio=keep_ratio, positions=positions, family=family, **options
    )
    chosen = settings.method
    if chosen.stage == "llm":
        from .adapters.llm_stage import LanguageStagePruner

        pruner: Any = LanguageStagePruner(model, family, settings)
    else:
        check_release(model)
        pruner = VisionStagePruner(model, family, settings)

    remove(model)
    pruner.install()
    return model


def check_arguments(
    num_tokens: int | None = None,
    important_ratio: float = DEFAULT_IMPORTANT_RATIO,
    method: str = "vispruner",
    *,
    budget: str = "per_crop",
    keep_ratio: float | None = None,
    positions: str | None = None,
    family: "Family | None" = None,
    **options: Any,
) -> "Settings":
    """The checked settings that :func:`apply` with these arguments would install on a model of
    ``family`` (None: the checks that hold for every family), without a model.

    Raises the ``ValueError`` that :func:`apply` would raise for a bad argument (``TypeError`` for
    a method ``family`` cannot run), so that callers (the lmms-eval plugin) can refuse a
    configuration before loading any weights.
    """
    from .adapters.positions import check_positions
    from .adapters.vision_stage import BUDGETS, Settings
    from .methods import check_options, get_method
    from .methods._checks import check_num_tokens, check_ratio

    chosen = get_method(method)
    original_only = family is not None and family.original_positions_only
    if keep_ratio is not None:
        if num_tokens is not None:
            raise ValueError(f"give num_tokens or keep_ratio, not both; got num_tokens={num_tokens!r}, keep_ratio={keep_ratio!r}")
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real) or not 0 < keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be a number in (0, 1]; got {keep_ratio!r}")
        keep_ratio = float(keep_ratio)
    else:
        num_tokens = check_num_tokens(DEFAULT_NUM_TOKENS if num_tokens is None else num_tokens)
    options = check_options(chosen, options)
    if options.get("clip") is not None and family is not None:
        from .adapters.clip_joint import check_family

        check_family(family.name)
    important_ratio = check_ratio(important_ratio, "important_ratio")
    if "important_ratio" in chosen.options:
        options = {**options, "important_ratio": important_ratio}
    elif important_ratio != DEFAULT_IMPORTANT_RATIO:
        takers = ", ".join(sorted(_methods_taking("important_ratio"))) or "none"
        raise ValueError(
            f"important_ratio is an option of methods {takers}, not of {chosen.name!r}; leave it at "
            f"{DEFAULT_IMPORTANT_RATIO}"
        )
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(map(repr, BUDGETS))}; got {budget!r}")
    if budget == "per_image" and family is not None and family.per_image is not None:
        raise ValueError(f"budget='per_image' is not supported on {family.name}: {family.per_image}; use budget='per_crop'")
    if positions is None:
        positions = "original" if chosen.stage == "llm" or original_only else "compacted"
    positions = check_positions(positions)
    if chosen.stage == "llm" and positions != "original":
        raise ValueError(
            f"positions={positions!r} is not supported by {chosen.name}: the tokens it keeps keep their "
            "original positions (the layers before the cut cached them there); use positions='original' "
            "or leave it unset"
        )
    if original_only and positions != "original":
        raise ValueError(
            f"{family.name} keeps the 3D M-RoPE positions of the unpruned prompt; positions must be 'original' "
            f"(the default for it); got {positions!r}"
        )
    if chosen.stage == "llm" and family is not None and family.language_stage is not None:
        raise TypeError(f"{chosen.name} does not support {family.name}: {family.language_stage}; choose a vision-stage method")
    return Settings(chosen, num_tokens, options, budget, keep_ratio, positions)


def remove(model: Model) -> Model:
    """Undo :func:`apply` on ``model`` (a no-op if it is not patched) and return it."""
    pruner = _pruner(model)
    if pruner is not None:
        pruner.remove()
    return model


@contextmanager
def pruned(model: Model, *args: Any, **kwargs: Any) -> Iterator[Model]:
    """``with vispruner.pruned(model, 64): ...``: :func:`apply` (same arguments) for the block,
    then the model as it was (unpatched, or with its earlier patch)."""
    before = _pruner(model)
    apply(model, *args, **kwargs)
    try:
        yield model
    finally:
        remove(model)
        if before is not None:
            before.install()


@contextmanager
def instructions(model: Model, texts: Sequence[str]) -> Iterator[Model]:
    """``with vispruner.instructions(model, questions): model.generate(...)``: the question of each
    prompt row (``texts[i]`` for row i of ``input_ids``) for the calls in the block.

    CDPruner with ``clip`` embeds them with CLIP's text tower, as the authors do (their eval
    passes the question alone, without the chat template); every other setting, and a model not
    patched, reads the instruction from the prompt's tokens or needs none, and does not use them
    (so callers may always give them). ``ValueError`` if ``texts`` is not a sequence of strings.
    """
    given = type(texts).__name__
    texts = list(texts) if isinstance(texts, Iterable) and not isinstance(texts, str) else None
    if texts is None or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"texts must be a sequence of strings, one per prompt row; got {given}")
    pruner = _pruner(model)
    if pruner is None:
        yield model
        return
    before = getattr(pruner, "texts", None)
    pruner.texts = texts
    try:
        yield model
    finally:
        pruner.texts = before


def last_selection(model: object) -> "list[ImageSelection] | None":
    """Per image, the patches kept at the model's last pruned forward (None before the first).

    Each :class:`~vispruner.adapters.vision_stage.ImageSelection` has ``keep`` and ``important``
    as (crops, N) bool masks over the patch grid ``grid``, and the kept, important and diverse
    patch indices of each crop. ``ValueError`` if ``model`` is not patched.
    """
    pruner = _pruner(model)
    if pruner is None:
        raise ValueError("model is not patched; call vispruner.apply(model, ...) first")
    return pruner.last


def _pruner(model: object) -> Any:
    from .adapters.vision_stage import PRUNER

    return vars(model).get(PRUNER) if hasattr(model, "__dict__") else None


def _methods_taking(option: str) -> list[str]:
    from .methods import available_methods, get_method

    return [name for name in available_methods() if option in get_method(name).options]
