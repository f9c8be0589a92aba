"""The plugin's ``--model_args``, checked before any weights load; each error is one line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: ``method=none``: the unpruned model, the baseline row of every table.
UNPRUNED = "none"
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
#: Keys lmms-eval adds itself (``--batch_size``, ``--max_batch_size``, ``--device``).
LOADING = ("dtype", "device_map", "attn_implementation", "device", "batch_size", "max_batch_size", "max_frames_num")


@dataclass(frozen=True)
class ModelArgs:
    pretrained: str  # "testbed", "testbed-qwen", a checkpoint path or a hub id
    method: str  # a registered method, or UNPRUNED
    pruning: dict[str, Any] = field(default_factory=dict)  # keyword arguments of vispruner.apply
    dtype: str = "auto"
    device_map: str | None = None
    attn_implementation: str | None = None
    device: str | None = None
    batch_size: int = 1
    max_frames_num: int = 32  # frames sampled from each video


def parse_model_args(given: dict[str, Any]) -> ModelArgs:
    """Check lmms-eval's parsed ``--model_args`` (plus the keys it adds); ``ValueError`` naming the key."""
    from vispruner.methods import available_methods, get_method

    args = {key: value for key, value in given.items() if value is not None}
    pretrained = args.pop("pretrained", None)
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError("model_args pretrained is required: 'testbed', 'testbed-qwen' or a checkpoint path or hub id")
    method = args.pop("method", "vispruner")
    if method != UNPRUNED and method not in available_methods():
        raise ValueError(f"model_args method must be {UNPRUNED!r} or one of {', '.join(available_methods())}; got {method!r}")
    loading = {key: args.pop(key) for key in LOADING if key in args}
    if method == UNPRUNED:
        if args:
            raise ValueError(f"model_args {', '.join(sorted(args))}: not used with method=none (the unpruned model)")
        pruning: dict[str, Any] = {}
    else:
        allowed = set(pruning_keys()) | set(get_method(method).options)
        unknown = sorted(set(args) - allowed)
        if unknown:
            raise ValueError(
                f"model_args {', '.join(unknown)}: unknown for method={method}; allowed: "
                f"{', '.join(sorted(allowed | {'pretrained', 'method', *LOADING}))}"
            )
        pruning = check_pruning(method, args)
    return ModelArgs(pretrained, method, pruning, **_loading(loading))


def check_pruning(method: str, pruning: dict[str, Any], family: Any = None) -> dict[str, Any]:
    """:func:`vispruner.apply`'s own checks (for ``family``, once the checkpoint's is known);
    ``pruning`` with the method's options as the checks return them (CDPruner's ``clip`` loaded,
    once)."""
    from vispruner.api import check_arguments

    try:
        settings = check_arguments(method=method, family=family, **pruning)
    except (ValueError, TypeError) as error:  # TypeError: a method the family cannot run
        raise ValueError(f"model_args {error}") from None
    return {key: settings.options.get(key, value) for key, value in pruning.items()}


def pruning_keys() -> tuple[str, ...]:
    """The named arguments of :func:`vispruner.apply` besides the model and the method (read from
    its checker, so that an option added there passes through here)."""
    import inspect

    from vispruner.api import check_arguments

    parameters = inspect.signature(check_arguments).parameters.values()
    return tuple(p.name for p in parameters if p.name not in ("method", "family") and p.kind is not p.VAR_KEYWORD)


def _loading(given: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "dtype" in given:
        if given["dtype"] not in DTYPES:
            raise ValueError(f"model_args dtype must be one of {', '.join(DTYPES)}; got {given['dtype']!r}")
        out["dtype"] = given["dtype"]
    if "attn_implementation" in given:
        if given["attn_implementation"] not in ATTENTION:
            raise ValueError(
                f"model_args attn_implementation must be one of {', '.join(ATTENTION)}; got {given['attn_implementation']!r}"
            )
        out["attn_implementation"] = given["attn_implementation"]
    for key in ("device_map", "device"):
        if key in given:
            if not isinstance(given[key], str) or not given[key]:
                raise ValueError(f"model_args {key} must be a device string (cpu, cuda, cuda:0, auto, ...); got {given[key]!r}")
            out[key] = given[key]
    for key in ("batch_size", "max_frames_num"):
        if key in given:
            out[key] = _positive_int(given[key], key)
    if "max_batch_size" in given:
        raise ValueError("model_args max_batch_size goes with batch_size=auto, which vispruner does not take; give a batch_size")
    return out


def _positive_int(value: Any, key: str) -> int:
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"{key} must be an integer >= 1; got {value!r}")
    return int(text)
