"""Every contact with transformers' generation protocol, in one module.

The wrappers in :mod:`.vision_stage` and :mod:`.llm_stage` sit between ``generate()``, the
model's ``forward``, its decoder layers and the mask builders, so they read arguments and outputs
whose names transformers changes from release to release. They read them through this module
only, so that the next rename upstream is a change here. Each choice says which releases it
serves. Outside :data:`TESTED` nothing is guessed: an argument that concerns the cache, the masks
or the positions and that this module does not know raises ``NotImplementedError``.

What moved, release by release, within the tested range:

* 5.19-5.23: the KV cache reaches ``forward``, decoder layers, attention modules,
  ``create_causal_mask``, ``create_masks_for_generate`` and Qwen's ``compute_3d_position_ids`` as
  ``past_key_values``; outputs carry it as ``past_key_values``.
* 5.24: the argument and the output field are ``cache``; ``past_key_values`` is a deprecated
  alias until 5.40 (``@deprecate_kwarg``), and ``output.past_key_values`` a deprecated property.
  LLaVA's outputs became
  ``Multimodal...OutputWithPast`` (``image_hidden_states`` a deprecated property; we read none).
* 5.25: the mask builders' ``@deprecate_kwarg`` also writes the alias into their signatures, so
  they list both ``cache`` and ``past_key_values``; :func:`cache_keyword` takes ``cache``, the
  first of :data:`CACHE_NAMES`. Nothing else we touch moved.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from typing import Any, Callable, Iterable

from torch import nn

#: The transformers releases the whole suite ran on: [low, high).
TESTED = ("5.19", "5.26")
#: The same range as pip writes it (pyproject.toml declares exactly this).
TESTED_RANGE = f"transformers>={TESTED[0]},<{TESTED[1]}"

#: The names under which the KV cache travels, newest first: ``cache`` from 5.24,
#: ``past_key_values`` up to 5.23 (and a deprecated alias from 5.24 until 5.40).
CACHE_NAMES = ("cache", "past_key_values")

#: Arguments of a model's ``forward``, a decoder layer, an attention module or a mask builder that
#: concern the cache, the masks or the positions and that the wrappers handle (5.19-5.25). A
#: family adds its own (its pixel and grid arguments, its streams).
KNOWN = frozenset(
    {
        "use_cache",
        "attention_mask",
        "position_ids",
        "position_embeddings",  # decoder layers: the rotary (cos, sin)
        "rope_deltas",  # Qwen-VL forward: the offset of decode positions
        "mm_token_type_ids",  # Qwen-VL: which tokens are image / video
        "token_type_ids",  # Gemma 3: bidirectional attention among image tokens
        "visual_pos_masks",  # Qwen3-VL language model: where deepstack features go (llm_stage._deepstack)
        "is_first_iteration",  # generate() -> create_masks_for_generate / forward (prefill flag)
        "or_mask_function",
        "and_mask_function",
        "block_sequence_ids",  # create_masks_for_generate (packed sequences; generate passes None)
        "logits_to_keep",
    }
)
#: What makes an argument's name concern the cache, the masks or the positions.
_CONCERNS = re.compile(r"cache|mask|position|past|rope|seq_len")


#: Stock model code of some releases that cannot take a pruned number of visual tokens:
#: class name -> (the releases [low, high), why). Vision-stage pruning refuses them (TypeError).
BROKEN_RELEASES = {
    "SmolVLMForConditionalGeneration": (
        ("5.20", "5.21"),
        "its inputs_merger cuts the image features into blocks of vision_config.patch_size rows, which a "
        "pruned count need not fill (5.19 and 5.21 on read them per image)",
    ),
}


class ProtocolDrift(NotImplementedError):
    """transformers handed the wrappers an argument they do not know and cannot safely ignore."""


def installed_version() -> str:
    import transformers

    return transformers.__version__


def is_tested(version: str) -> bool:
    from packaging.version import Version

    return Version(TESTED[0]) <= Version(Version(version).base_version) < Version(TESTED[1])


@functools.lru_cache(maxsize=None)
def warn_if_untested() -> None:
    """Warn once per process when the installed transformers is outside :data:`TESTED`."""
    version = installed_version()
    if not is_tested(version):
        warnings.warn(
            f"vispruner was tested on {TESTED_RANGE}; transformers {version} is installed. Pruning may "
            f"fail or, worse, answer differently from the unpruned model: pip install '{TESTED_RANGE}'",
            RuntimeWarning,
            stacklevel=3,
        )


def check_release(model: nn.Module) -> None:
    """``TypeError`` when the installed release's stock code of ``model`` cannot take pruned visual
    tokens (:data:`BROKEN_RELEASES`), naming the releases that can."""
    from packaging.version import Version

    name = type(model).__name__
    if name not in BROKEN_RELEASES:
        return
    (low, high), why = BROKEN_RELEASES[name]
    version = installed_version()
    if Version(low) <= Version(Version(version).base_version) < Version(high):
        raise TypeError(
            f"pruning {name}'s visual tokens needs {TESTED_RANGE} outside >={low},<{high}; transformers {version} "
            f"is installed, and {why}"
        )


def check_known(arguments: dict[str, Any], where: str, extra: Iterable[str] = ()) -> None:
    """Raise :class:`ProtocolDrift` for a set argument the wrappers do not know that concerns the
    cache (it holds a ``Cache``, or its name says so), the masks or the positions."""
    from transformers.cache_utils import Cache

    known = KNOWN.union(extra)
    for name, value in arguments.items():
        if value is None or name in known:
            continue
        if isinstance(value, Cache) or _CONCERNS.search(name):
            raise ProtocolDrift(
                f"{where} received {name}={type(value).__name__}, an argument vispruner does not know; it was "
                f"tested on {TESTED_RANGE} (transformers {installed_version()} is installed). Refusing rather "
                f"than answering wrong: pip install '{TESTED_RANGE}', or vispruner.remove(model)"
            )


def check_generate(generate: Callable[..., Any], arguments: dict[str, Any], extra: Iterable[str] = ()) -> None:
    """:func:`check_known` for the model keyword arguments of a ``generate()`` call: its declared
    parameters and the settings of ``GenerationConfig`` (``cache_implementation``, ...) are
    ``generate()``'s own business."""
    from transformers import GenerationConfig

    own = set(inspect.signature(generate).parameters)
    own |= {name for name in arguments if name in vars(GenerationConfig()) or hasattr(GenerationConfig, name)}
    check_known(arguments, "generate()", own.union(extra))


def cache_in(arguments: dict[str, Any], function: Callable[..., Any], where: str, extra: Iterable[str] = ()) -> Any:
    """The KV cache among the arguments of a call to ``function`` (as installed), or None.

    Only the names ``function`` takes count (:func:`cache_names`), and the other arguments are
    checked with :func:`check_known` first: a cache under a name this release does not take (a
    rename upstream, or ``cache=`` before 5.24, which the model would ignore) raises instead of
    being missed, which would decode a compacted cache with unpruned masks and positions.
    """
    names = cache_names(function)
    check_known(arguments, where, set(names).union(extra))
    found = [arguments[name] for name in names if arguments.get(name) is not None]
    if len(found) > 1 and found[0] is not found[1]:
        raise ValueError(f"{where} got both {' and '.join(CACHE_NAMES)}; pass one")
    return found[0] if found else None


def cache_of(output: Any) -> Any:
    """The KV cache a model's output carries (``cache`` from 5.24, ``past_key_values`` before)."""
    from transformers.cache_utils import Cache
    from transformers.utils import ModelOutput

    if isinstance(output, ModelOutput):
        for name in CACHE_NAMES:
            # Read the field, not the 5.24 deprecated ``past_key_values`` property (it warns).
            if name in output.__dataclass_fields__:
                return getattr(output, name)
        return None
    return next((item for item in output if isinstance(item, Cache)), None)


def cached_length(cache: Any, layer: int | None = None) -> int:
    """Tokens a cache holds (of ``layer``, when given), 0 for no cache."""
    if cache is None:
        return 0
    return cache.get_seq_length() if layer is None else cache.get_seq_length(layer)


def is_static(cache: Any) -> bool:
    """Whether a cache has a fixed length (``StaticCache``), which a shortened prefill cannot use."""
    return bool(getattr(cache, "is_compileable", False))


def cache_keyword(function: Callable[..., Any]) -> str:
    """The name under which ``function`` (as installed) takes the cache."""
    return _cache_keyword(getattr(function, "__func__", function))  # a bound method: its function


def cache_names(function: Callable[..., Any]) -> tuple[str, ...]:
    """The names under which ``function`` (as installed) takes the cache: its parameter and, from
    5.24 on, the deprecated alias ``past_key_values``."""
    own = cache_keyword(function)
    return (own,) if own == "past_key_values" else (own, "past_key_values")


@functools.lru_cache(maxsize=None)
def _cache_keyword(function: Callable[..., Any]) -> str:
    parameters = inspect.signature(function).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise ProtocolDrift(
        f"{getattr(function, '__qualname__', function)} takes none of {CACHE_NAMES}; vispruner was tested on "
        f"{TESTED_RANGE} (transformers {installed_version()} is installed)"
    )


def call_with_cache(function: Callable[..., Any], cache: Any, **arguments: Any) -> Any:
    """``function(**arguments)`` with ``cache`` passed under the name the installed release uses."""
    return function(**arguments, **{cache_keyword(function): cache})


def causal_mask(config: Any, inputs_embeds: Any, attention_mask: Any, cache: Any, layer: int) -> Any:
    """The decoder's causal mask for ``inputs_embeds`` after ``cache``, built as the model builds it.

    No ``position_ids``: kept tokens may have gapped positions, which must not read as packed
    sequences.
    """
    from transformers.masking_utils import create_causal_mask

    return call_with_cache(
        create_causal_mask,
        cache,
        config=config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=None,
        layer_idx=layer,
    )


def masks_for_generate(model: nn.Module) -> Callable[..., Any]:
    """What ``generate()`` calls to build the masks of a static-cache step: the model's own
    ``create_masks_for_generate`` if it has one (Gemma 3, Qwen3.5), else transformers' generic one."""
    from transformers.generation.utils import create_masks_for_generate

    return getattr(model, "create_masks_for_generate", create_masks_for_generate)
