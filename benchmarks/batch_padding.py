"""Prefill time of a pruned, left-padded batch: padding dropped (now) vs padding kept (before).

A batch of two prompts, one with two images and one with one, is left-padded to the longer
prompt. Before issue 12 the compaction kept the shorter row's padding, so the language model's
prefill was as wide as that padding plus the row's kept tokens; now it is exactly as wide as the
longest kept row. The script runs the pruned model once to get the language model's inputs (the
new layout), rebuilds the old layout from them (the same kept tokens, each row's input padding
put back as masked columns on the left), checks that both give the same last-token logits, and
times them side by side, interleaved:

* language-model prefill: the decoder on each layout, then the last token's logits;
* whole prefill: ``model(**inputs)`` of the pruned model (vision tower included), with the old
  layout swapped in by a pre-hook on the language model for the "before" runs.

    python benchmarks/batch_padding.py [--preset llava-1.5-7b --layers 2 --tokens 32 --repeats 5]
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

import vispruner
from vispruner.bench.inputs import default_image_size, image_inputs, placeholders_per_image
from vispruner.bench.presets import PRESETS, build_preset
from vispruner.bench.timing import interleaved_medians

TEXT_TOKENS = 2  # per prompt, besides BOS: a short question, as in the example


def two_prompts(model: Any) -> dict[str, torch.Tensor]:
    """Left-padded batch: [BOS, image, image, text] and [BOS, image, text]."""
    images = image_inputs(model, 3, default_image_size(model))
    placeholders = placeholders_per_image(model, images)
    text = model.config.text_config
    image = [model.config.image_token_id] * placeholders
    words = [5, 6][:TEXT_TOKENS]
    rows = [[text.bos_token_id or 1, *image, *image, *words], [text.bos_token_id or 1, *image, *words]]
    width = max(len(row) for row in rows)
    pad = getattr(model.config, "pad_token_id", None) or 0
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, **images}


def old_layout(new: dict[str, torch.Tensor], input_pads: torch.Tensor) -> dict[str, torch.Tensor]:
    """The layout the old compaction produced: each row's kept tokens after its input padding."""
    embeds, mask, positions = new["inputs_embeds"], new["attention_mask"], new["position_ids"]
    kept = mask.sum(dim=1)
    width = int((kept + input_pads).max())
    batch, _, dim = embeds.shape
    out_embeds = embeds.new_zeros(batch, width, dim)
    out_mask = mask.new_zeros(batch, width)
    out_positions = positions.new_zeros(batch, width)
    for row in range(batch):
        count = int(kept[row])
        out_embeds[row, width - count :] = embeds[row, -count:]
        out_mask[row, width - count :] = 1
        out_positions[row, width - count :] = positions[row, -count:]
    return {"inputs_embeds": out_embeds, "attention_mask": out_mask, "position_ids": out_positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-1.5-7b", choices=[n for n in PRESETS if "next" not in n])
    parser.add_argument("--layers", type=int, default=2, help="language-model layers kept (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="visual tokens kept per image (default 32)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, full_depth = build_preset(args.preset, layers=args.layers)
    inputs = two_prompts(model)
    input_pads = (inputs["attention_mask"] == 0).sum(dim=1)
    vispruner.apply(model, args.tokens)
    language_model = model.model.language_model

    seen: dict[str, torch.Tensor] = {}

    def record(module: Any, args_: tuple, kwargs: dict[str, Any]) -> None:
        seen.update({name: kwargs[name] for name in ("inputs_embeds", "attention_mask", "position_ids")})

    handle = language_model.register_forward_pre_hook(record, with_kwargs=True)
    with torch.inference_mode():
        model(**inputs, logits_to_keep=1)
    handle.remove()
    new, old = dict(seen), old_layout(seen, input_pads)

    def lm_prefill(layout: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.inference_mode():
                hidden = language_model(**layout, use_cache=True).last_hidden_state
                return model.lm_head(hidden[:, -1])

        return run

    torch.testing.assert_close(lm_prefill(old)(), lm_prefill(new)(), rtol=1e-3, atol=1e-3)

    def swap_in_old(module: Any, args_: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        return args_, {**kwargs, **old}

    def whole_prefill(layout_hook: Callable[..., Any] | None) -> Callable[[], Any]:
        def run() -> Any:
            handle = language_model.register_forward_pre_hook(layout_hook, with_kwargs=True) if layout_hook else None
            try:
                with torch.inference_mode():
                    return model(**inputs, use_cache=True, logits_to_keep=1)
            finally:
                if handle is not None:
                    handle.remove()

        return run

    lm_old, lm_new = interleaved_medians(lm_prefill(old), lm_prefill(new), args.repeats)
    all_old, all_new = interleaved_medians(whole_prefill(swap_in_old), whole_prefill(None), args.repeats)

    prompt = inputs["input_ids"].shape[1]
    print(
        f"{args.preset}, {args.layers} of {full_depth} LM layers, float32, {torch.get_num_threads()} threads; "
        f"2 prompts (2 images + {TEXT_TOKENS + 1} text, 1 image + {TEXT_TOKENS + 1} text), "
        f"left-padded to {prompt}; {args.tokens} tokens kept per image; {args.repeats} interleaved repeats, medians"
    )
    print(f"prefill width        : {old['inputs_embeds'].shape[1]} before, {new['inputs_embeds'].shape[1]} now")
    print(f"LM prefill           : {lm_old * 1e3:9.1f} ms before, {lm_new * 1e3:9.1f} ms now, {lm_old / lm_new:5.2f}x")
    print(f"whole prefill        : {all_old * 1e3:9.1f} ms before, {all_new * 1e3:9.1f} ms now, {all_old / all_new:5.2f}x")


if __name__ == "__main__":
    main()
