"""Loading the checkpoint named by ``pretrained``: its family from its config, before any weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .arguments import UNPRUNED, ModelArgs, check_pruning


def checkpoint(pretrained: str) -> tuple[str, bool]:
    """``(path or hub id, local only)``; ``"testbed"`` and ``"testbed-qwen"`` are the bundled testbeds."""
    from vispruner.testbed.model import TESTBEDS, testbed_weights

    if pretrained in TESTBEDS:
        return str(testbed_weights(pretrained)), True
    return pretrained, Path(pretrained).is_dir()


def check_checkpoint(args: ModelArgs) -> str:
    """The checkpoint's ``model_type``, read from its config alone, if :func:`vispruner.apply`
    supports it and takes ``args``' pruning for it; ``ValueError`` otherwise."""
    from transformers import AutoConfig

    from vispruner.adapters import FAMILIES, SUPPORTED, family_of_type

    path, local = checkpoint(args.pretrained)
    model_type = AutoConfig.from_pretrained(path, local_files_only=local).model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model_args pretrained: {args.pretrained!r} is a {model_type!r} model; vispruner supports {SUPPORTED}")
    if args.method != UNPRUNED:
        check_pruning(args.method, args.pruning, family_of_type(model_type))
    return model_type


def load(args: ModelArgs, device: Any) -> tuple[Any, Any]:
    """The model (on ``device`` unless ``device_map`` places it), pruned as ``args`` says, and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import vispruner
    from vispruner.testbed.model import TESTBEDS, testbed_processor

    path, local = checkpoint(args.pretrained)
    extra = {} if args.attn_implementation is None else {"attn_implementation": args.attn_implementation}
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=args.dtype, device_map=args.device_map, local_files_only=local, **extra
    )
    if args.device_map is None:
        model.to(device)
    if args.pretrained in TESTBEDS:
        processor = testbed_processor(Path(path), model.config.model_type)
    else:
        processor = AutoProcessor.from_pretrained(path, local_files_only=local)
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"model_args pretrained: {args.pretrained!r} has no chat template; the plugin prompts through it")
    if args.method != UNPRUNED:
        vispruner.apply(model, method=args.method, **args.pruning)
    return model.eval(), processor
