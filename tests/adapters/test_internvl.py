"""InternVL against the step-by-step reference (reference_tiles.py): a left-padded batch with
images of different tile counts, two images and a video in one prompt; what the language model
receives, greedy tokens (dynamic, static, no cache, eager), sampling with several sequences,
beam scores, the loss with labels, FastV, and the refusals."""

from __future__ import annotations

import pytest
import torch

import vispruner
from vispruner.methods import available_methods, get_method

from tests.tiny_internvl import PROMPTS, TOKENS, internvl_inputs, tiny_internvl

from .reference import continuation_logits, greedy, lm_logits
from .reference_fastv import fastv_greedy
from .reference_tiles import internvl_tiles, tile_rows

NUM_TOKENS = 5
STEPS = 4
VISION_METHODS = [name for name in available_methods() if get_method(name).stage == "vision"]
#: Every vision method, and VisionZip with contextual tokens (merged by keys; 5 * 10/64 rounds to none).
RUNS = [(name, None) for name in VISION_METHODS] + [("visionzip", {"contextual_ratio": 0.5})]


def prepared(method="vispruner", options=None, **build):
    model = tiny_internvl(**build)
    inputs = internvl_inputs(PROMPTS)
    tiles = internvl_tiles(model, inputs["pixel_values"], method, NUM_TOKENS, **(options or {}))
    rows = tile_rows(model, inputs["input_ids"], inputs["attention_mask"], tiles, TOKENS)
    vispruner.apply(model, NUM_TOKENS, method=method, **(options or {}))
    return model, inputs, rows


def new_tokens(out, inputs) -> list[list[int]]:
    return out[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize(("method", "options"), RUNS)
def test_language_model_receives_text_and_kept_tokens(method, options):
    model, inputs, rows = prepared(method, options)
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])
        seen.setdefault("mask", kwargs["attention_mask"])

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    finally:
        handle.remove()
    for embeds, mask, (expected, _) in zip(seen["embeds"], seen["mask"], rows, strict=True):
        torch.testing.assert_close(embeds[mask.bool()], expected, rtol=1e-5, atol=1e-6)
    assert new_tokens(out, inputs) == [greedy(model, embeds, STEPS) for embeds, _ in rows]
    selections = vispruner.last_selection(model)
    assert len(selections) == inputs["pixel_values"].shape[0]  # one per tile (thumbnails and frames too)
    assert all(selection.keep.sum(dim=1).tolist() == [NUM_TOKENS] for selection in selections)


@pytest.mark.parametrize(
    ("attn_implementation", "generate_options", "qk_norm"),
    [("eager", {}, True), ("sdpa", {"cache_implementation": "static"}, True), ("sdpa", {"use_cache": False}, True),
     ("sdpa", {}, False)],
    ids=["eager", "static-cache", "no-cache", "no-qk-norm"],
)
def test_greedy_tokens_match_reference(attn_implementation, generate_options, qk_norm):
    model, inputs, rows = prepared(attn_implementation=attn_implementation, qk_norm=qk_norm)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **generate_options)
    assert new_tokens(out, inputs) == [greedy(model, embeds, STEPS) for embeds, _ in rows]


def test_sampling_with_several_sequences():
    model, inputs, rows = prepared()
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=True, num_return_sequences=2,
        return_dict_in_generate=True, output_logits=True,
    )
    logits = torch.stack(out.logits, dim=1)
    for index, sequence in enumerate(out.sequences[:, inputs["input_ids"].shape[1] :]):
        expected = continuation_logits(model, rows[index // 2][0], sequence.tolist())
        torch.testing.assert_close(logits[index], expected, rtol=1e-4, atol=1e-5)


def test_beam_search_scores():
    model, inputs, rows = prepared()
    out = model.generate(
        **inputs, max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, length_penalty=0.0,
        do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    for index, sequence in enumerate(out.sequences[:, inputs["input_ids"].shape[1] :]):
        tokens = sequence.tolist()
        log_probs = continuation_logits(model, rows[index // 2][0], tokens).log_softmax(dim=-1)
        torch.testing.assert_close(out.sequences_scores[index], log_probs[torch.arange(len(tokens)), sequence].sum(),
                                   rtol=1e-4, atol=1e-4)


def test_forward_with_labels():
    model, inputs, rows = prepared()
    first = inputs["attention_mask"].cumsum(dim=1) == 1
    ignored = (inputs["input_ids"] == model.config.image_token_id) | (inputs["attention_mask"] == 0) | first
    labels = inputs["input_ids"].masked_fill(ignored, -100)
    total, count = 0.0, 0
    for (embeds, sources), ids, row_labels, mask in zip(rows, inputs["input_ids"], labels, inputs["attention_mask"]):
        text = iter(row_labels[mask.bool() & (ids != model.config.image_token_id)].tolist())
        targets = torch.tensor([next(text) if source >= 0 else -100 for source in sources.tolist()])[1:]
        logits = lm_logits(model, embeds)[:-1]
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)


def test_fastv_matches_reference():
    layer = 2
    model = tiny_internvl(text_layers=4)
    inputs = internvl_inputs(PROMPTS)
    tiles = internvl_tiles(model, inputs["pixel_values"], "random", TOKENS)  # every token
    rows = tile_rows(model, inputs["input_ids"], inputs["attention_mask"], tiles, TOKENS)
    vispruner.apply(model, NUM_TOKENS, method="fastv", layer=layer)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)
    tile = 0
    for row, (embeds, sources) in enumerate(rows):
        image = (sources < 0).long()
        # Each tile's tokens are one group; text is -1.
        groups = torch.where(image.bool(), (image.cumsum(0) - 1) // TOKENS + tile, -1)
        tile += int(image.sum()) // TOKENS
        tokens, expected = fastv_greedy(model, embeds, groups, layer, NUM_TOKENS, STEPS)
        assert new_tokens(out.sequences, inputs)[row] == tokens
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-5)


def test_refusals_and_remove():
    model = tiny_internvl()
    inputs = internvl_inputs(PROMPTS)
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    with pytest.raises(ValueError, match="per_image.*InternVL.*which image each tile"):
        vispruner.apply(model, NUM_TOKENS, budget="per_image")
    vispruner.apply(model, NUM_TOKENS)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        model(**inputs, vision_feature_select_strategy="full")
    assert not torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)
    vispruner.remove(model)
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)


def test_lmms_plugin_reads_the_family_from_the_config(tmp_path):
    from vispruner.lmms.arguments import parse_model_args
    from vispruner.lmms.loading import check_checkpoint

    tiny_internvl().config.save_pretrained(tmp_path)  # config only: nothing to load
    assert check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8})) == "internvl"
    with pytest.raises(ValueError, match="per_image.*not supported on InternVL"):
        check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8, "budget": "per_image"}))
