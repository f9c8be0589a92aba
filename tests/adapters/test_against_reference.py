"""Pruned LLaVA / LLaVA-NeXT against the step-by-step reference (see reference.py).

Each test patches a tiny random model, runs the user-facing call (generate or forward) on a
left-padded batch with prompts of different lengths and two images in one prompt, and compares
with the reference, which feeds one row at a time, only text and kept image tokens, to the
language model without a cache.
"""

from __future__ import annotations

import pytest
import torch
from transformers import StaticCache

import vispruner
from vispruner.methods import available_methods, get_method

from tests.tiny_models import VOCAB, tiny_inputs

from .cases import FAMILIES, NUM_TOKENS, equal_length_texts, inputs_for, model_and_inputs, prepared, right_padded
from .reference import continuation_logits, greedy, lm_logits, reference_images, reference_loss, reference_sequences

STEPS = 5
# cdpruner selects by each row's instruction, which these references do not carry; its own
# reference is tests/adapters/test_cdpruner_apply.py.
VISION_METHODS = [name for name in available_methods() if get_method(name).stage == "vision" and name != "cdpruner"]


def prompt_length(inputs) -> int:
    return inputs["input_ids"].shape[1]


@pytest.mark.parametrize(
    ("family", "budget"),
    # LLaVA-1.5 has one crop per image: its two budgets are the same.
    [("llava", "per_crop"), ("llava_next", "per_crop"), ("llava_next", "per_image")],
)
@pytest.mark.parametrize("method", VISION_METHODS)
def test_language_model_receives_text_and_kept_tokens(family, budget, method):
    # Per image, an image's crops are one sequence whose grids stack vertically; the reference
    # lays them out by hand, so a method that reads the grid (pooling) sees a wrong stacking.
    model, inputs, images, rows = prepared(family, budget=budget, method=method)
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])
        seen.setdefault("mask", kwargs["attention_mask"])

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        handle.remove()
    for embeds, mask, (expected, _), image in zip(seen["embeds"], seen["mask"], rows, images):
        torch.testing.assert_close(embeds[mask.bool()], expected, rtol=1e-5, atol=1e-6)
    selections = vispruner.last_selection(model)
    for selection, image in zip(selections, images, strict=True):
        assert torch.equal(selection.keep, image.keep)
        assert (selection.important is None) == (image.important is None)
        if image.important is not None:
            assert torch.equal(selection.important, image.important)
    # Exactly as wide as the longest kept row: pruned placeholders and the input's padding are gone.
    assert seen["embeds"].shape[1] == max(len(expected) for expected, _ in rows) < prompt_length(inputs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("attn_implementation", "generate_options"),
    [("sdpa", {}), ("eager", {}), ("sdpa", {"cache_implementation": "static"}), ("sdpa", {"use_cache": False})],
    ids=["dynamic-cache", "eager", "static-cache", "no-cache"],
)
def test_greedy_tokens_match_reference(family, attn_implementation, generate_options):
    model, inputs, _, rows = prepared(family, attn_implementation)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **generate_options)
    assert out[:, : prompt_length(inputs)].equal(inputs["input_ids"])
    assert out[:, prompt_length(inputs) :].tolist() == [greedy(model, embeds, STEPS) for embeds, _ in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_several_sequences_uses_compacted_mask_and_positions(family):
    model, inputs, _, rows = prepared(family)
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=True, num_return_sequences=2,
        return_dict_in_generate=True, output_logits=True,
    )
    logits = torch.stack(out.logits, dim=1)
    for index, sequence in enumerate(out.sequences[:, prompt_length(inputs) :]):
        expected = continuation_logits(model, rows[index // 2][0], sequence.tolist())
        torch.testing.assert_close(logits[index], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_scores_match_reference(family):
    model, inputs, _, rows = prepared(family)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, length_penalty=0.0,
        do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    for index, sequence in enumerate(out.sequences[:, prompt_length(inputs) :]):
        tokens = sequence.tolist()
        log_probs = continuation_logits(model, rows[index // 2][0], tokens).log_softmax(dim=-1)
        expected = log_probs[torch.arange(len(tokens)), sequence].sum()
        torch.testing.assert_close(out.sequences_scores[index], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_forward_with_labels_matches_reference_loss(family, padding):
    model, inputs, _, rows = prepared(family)
    if padding == "right":
        inputs = right_padded(inputs)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, -100)
    # Padding, and each row's first token, which nothing before it in the row predicts.
    first = inputs["attention_mask"].cumsum(dim=1) == 1
    labels = labels.masked_fill((inputs["attention_mask"] == 0) | first, -100)
    out = model(**inputs, labels=labels)
    expected = reference_loss(model, rows, inputs["input_ids"], labels, inputs["attention_mask"])
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for row, (embeds, _) in enumerate(rows):
        # The compacted batch is left padded whatever the input's side: a row's last token is last.
        torch.testing.assert_close(out.logits[row, -1], lm_logits(model, embeds)[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_batch_that_pruning_leaves_uneven(family):
    # generate() drops the all-ones mask: decode steps rebuild it from the compacted prefill's.
    model, _ = model_and_inputs(family)
    inputs = inputs_for(model, family, equal_length_texts(model, family))
    images = reference_images(model, inputs["pixel_values"], inputs.get("image_sizes"), NUM_TOKENS)
    rows = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    vispruner.apply(model, NUM_TOKENS)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert out[:, prompt_length(inputs) :].tolist() == [greedy(model, embeds, STEPS) for embeds, _ in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pad_id_equal_to_the_image_id_does_not_pad_the_compacted_batch(family):
    # Some checkpoints set the text model's pad id to the image placeholder's. The compacted batch
    # of two unpadded prompts that pruning leaves uneven is padded; placeholder ids there would be
    # read as image tokens.
    model, _ = model_and_inputs(family)
    model.config.text_config.pad_token_id = model.config.image_token_id
    inputs = inputs_for(model, family, equal_length_texts(model, family))
    images = reference_images(model, inputs["pixel_values"], inputs.get("image_sizes"), NUM_TOKENS)
    rows = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    assert inputs["attention_mask"].all() and len({len(embeds) for embeds, _ in rows}) == 2
    vispruner.apply(model, NUM_TOKENS)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert out[:, prompt_length(inputs) :].tolist() == [greedy(model, embeds, STEPS) for embeds, _ in rows]


def test_a_static_cache_reset_and_reused_by_a_text_only_prompt():
    # As a compiled decoding set-up does: one StaticCache, reset between calls. The text-only
    # prompt after a pruned one must not be read with the old prompt's compacted layout.
    model, inputs, _, rows = prepared("llava")
    text = tiny_inputs(model, ["w1 w2 w3", "w4 w5"])
    text_rows = reference_sequences(model, text["input_ids"], text["attention_mask"], [])
    cache = StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=128)
    for batch, expected in ((inputs, rows), (text, text_rows)):
        cache.reset()
        out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False, past_key_values=cache)
        assert out[:, prompt_length(batch) :].tolist() == [greedy(model, embeds, STEPS) for embeds, _ in expected]


@pytest.mark.parametrize("family", FAMILIES)
def test_inputs_embeds_and_a_hand_written_decode_loop(family):
    model, inputs = model_and_inputs(family)
    # Placeholders are the embeddings equal to the image token's in every coordinate: a word
    # whose embedding shares half of them is still text.
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        table[VOCAB.index("w1"), : table.shape[1] // 2] = table[model.config.image_token_id, : table.shape[1] // 2]
    images = reference_images(model, inputs["pixel_values"], inputs.get("image_sizes"), NUM_TOKENS)
    rows = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    vispruner.apply(model, NUM_TOKENS)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
    fields = {k: v for k, v in inputs.items() if k != "input_ids"}
    out = model(inputs_embeds=embeds, **fields, use_cache=True)
    next_tokens = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    # The caller keeps the full-length mask, as it would for an unpruned model.
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_tokens)], dim=1)
    step = model(input_ids=next_tokens, attention_mask=mask, past_key_values=out.past_key_values)
    for row, (expected, _) in enumerate(rows):
        reference = continuation_logits(model, expected, [int(next_tokens[row])] + [0])
        torch.testing.assert_close(out.logits[row, -1], reference[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step.logits[row, -1], reference[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_mask", [True, False], ids=["full-length-mask", "no-mask"])
def test_decode_loop_without_position_ids(family, with_mask):
    # generate() always passes position_ids; a user's own loop often passes none, so each step's
    # positions come from the cache length and the tokens pruned from the row. Several steps,
    # then one step of two tokens. Without a mask: two unpadded prompts of one length, with one
    # image and with two, which pruning leaves uneven (the compacted prefill is padded).
    model, inputs = model_and_inputs(family)
    if not with_mask:
        inputs = inputs_for(model, family, equal_length_texts(model, family))
        assert inputs["attention_mask"].all()
    images = reference_images(model, inputs["pixel_values"], inputs.get("image_sizes"), NUM_TOKENS)
    rows = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    vispruner.apply(model, NUM_TOKENS)
    prompt = dict(inputs) if with_mask else {k: v for k, v in inputs.items() if k != "attention_mask"}
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = model(**prompt, use_cache=True)
        logits, cache = [out.logits[:, -1:]], out.past_key_values
        chosen = [out.logits[:, -1:].argmax(dim=-1)]
        for _ in range(STEPS - 1):
            mask = torch.cat([mask, torch.ones_like(chosen[-1])], dim=1)
            step = model(input_ids=chosen[-1], attention_mask=mask if with_mask else None, past_key_values=cache)
            logits.append(step.logits[:, -1:])
            chosen.append(step.logits[:, -1:].argmax(dim=-1))
            cache = step.past_key_values
        pair = torch.cat([chosen[-1], torch.full_like(chosen[-1], 5)], dim=1)
        mask = torch.cat([mask, torch.ones_like(pair)], dim=1)
        logits.append(model(input_ids=pair, attention_mask=mask if with_mask else None, past_key_values=cache).logits)
    logits, tokens = torch.cat(logits, dim=1), torch.cat(chosen, dim=1)
    for row, (embeds, _) in enumerate(rows):
        expected = continuation_logits(model, embeds, tokens[row].tolist() + [5, 0])
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_output_straight_to_generate_single_prompt(family):
    # One unpadded prompt: generate drops the all-ones mask, so only positions carry the layout.
    model, inputs = model_and_inputs(family, texts=["w3 <image> w4 w5"])
    images = reference_images(model, inputs["pixel_values"], inputs.get("image_sizes"), NUM_TOKENS)
    (embeds, _), = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    vispruner.apply(model, NUM_TOKENS)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert out[0, prompt_length(inputs) :].tolist() == greedy(model, embeds, STEPS)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["per_crop", "per_image"])
def test_budget_counts_and_greedy_tokens(family, budget):
    model, inputs, images, rows = prepared(family, budget=budget)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert out[:, prompt_length(inputs) :].tolist() == [greedy(model, embeds, STEPS) for embeds, _ in rows]
    for selection in vispruner.last_selection(model):
        crops, patches = selection.keep.shape
        if budget == "per_crop":
            assert selection.keep.sum(dim=1).tolist() == [NUM_TOKENS] * crops
        else:
            assert int(selection.keep.sum()) == min(NUM_TOKENS, crops * patches)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", ["per_crop", "per_image"])
def test_keep_ratio_is_a_rounded_share_of_each_unit(family, budget):
    # 0.1 of a 64-patch crop is 6.4 -> 6; of a 5-crop image (320 patches) exactly 32.
    model, inputs = model_and_inputs(family)
    images = reference_images(model, inputs["pixel_values"], inputs.get("image_sizes"), 6)
    rows = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    vispruner.apply(model, keep_ratio=0.1, budget=budget)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    for selection in vispruner.last_selection(model):
        crops, patches = selection.keep.shape
        if budget == "per_crop":
            assert selection.keep.sum(dim=1).tolist() == [6] * crops
        else:
            assert int(selection.keep.sum()) == int(crops * patches * 0.1 + 0.5)
    if budget == "per_crop":
        assert out[:, prompt_length(inputs) :].tolist() == [greedy(model, embeds, STEPS) for embeds, _ in rows]
