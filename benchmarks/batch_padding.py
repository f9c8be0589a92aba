"""Language-model prefill of a pruned, left-padded batch: padding dropped (now) vs kept (before).

A batch of two prompts, one with two images and one with one, is left-padded to the longer
prompt. Before issue 12 the compaction kept the shorter row's padding, so the language model's
prefill was as wide as that padding plus the row's kept tokens; now it is exactly as wide as the
longest kept row. The script runs the pruned model once to get the language model's inputs (the
new layout), rebuilds the old layout from them (the same kept tokens, each row's input padding
put back as masked columns on the left), checks that both give the same last-token logits, and
times the decoder plus the last token's logits on each, side by side, interleaved.

The vision tower runs once, only to produce the layout; ``--vision-layers`` cuts it (default 2
of CLIP-L's 24) to save CPU time, which changes nothing that is timed.

    python benchmarks/batch_padding.py [--preset llava-1.5-7b --layers 2 --tokens 32 --repeats 3]
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

import vispruner
from vispruner.bench.inputs import default_image_size, image_inputs, placeholders_per_image
from vispruner.bench.presets import PRESETS
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
    from transformers import AutoModelForImageTextToText

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llava-1.5-7b", choices=[n for n in PRESETS if "next" not in n])
    parser.add_argument("--layers", type=int, default=2, help="language-model layers kept (default 2)")
    parser.add_argument("--vision-layers", type=int, default=2, help="vision-tower layers kept (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="visual tokens kept per image (default 32)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = PRESETS[args.preset].config()
    full_depth = config.text_config.num_hidden_layers
    config.text_config.num_hidden_layers = args.layers
    config.vision_config.num_hidden_layers = args.vision_layers
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
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
    before, now = interleaved_medians([lm_prefill(old), lm_prefill(new)], args.repeats)

    print(
        f"{args.preset}, {args.layers} of {full_depth} LM layers, float32, {torch.get_num_threads()} threads; "
        f"2 prompts (2 images + {TEXT_TOKENS + 1} text, 1 image + {TEXT_TOKENS + 1} text), "
        f"left-padded to {inputs['input_ids'].shape[1]}; {args.tokens} tokens kept per image; "
        f"{args.repeats} interleaved repeats, medians (same last-token logits checked first)"
    )
    print(f"prefill width : {old['inputs_embeds'].shape[1]} before, {new['inputs_embeds'].shape[1]} now")
    print(f"LM prefill    : {before * 1e3:9.1f} ms before, {now * 1e3:9.1f} ms now, {before / now:5.2f}x")


if __name__ == "__main__":
    main()
