"""Pruned GLM-4.1V / GLM-4.5V against the step-by-step reference (see reference_qwen.py).

Batches are left padded, with prompts of different lengths, several images of different sizes
in one row, and videos of several temporal groups (in their own batches: the stock models take
images and videos in separate calls).
"""

from __future__ import annotations

import pytest
import torch

import vispruner
from vispruner.adapters.glm4v import GlmVision
from vispruner.adapters.qwen_vision import IMAGE

from ..tiny_glm import BUILDERS, IMAGE_ID, IMAGES, VIDEOS, tiny_glm_inputs
from .reference_qwen import (
    continuation_logits,
    fastv_greedy,
    greedy,
    reference_items,
    reference_loss,
    reference_rows,
    tower_signals,
)
from .test_qwen import VISION_METHODS

FAMILIES = tuple(BUILDERS)
NUM_TOKENS = 3
STEPS = 4


def prepared(family, prompts=IMAGES, method="vispruner", attn_implementation="sdpa", per_video=False, **options):
    model = BUILDERS[family](attn_implementation=attn_implementation)
    inputs = tiny_glm_inputs(prompts)
    images = videos = []
    if "pixel_values" in inputs:
        images = reference_items(model, inputs["pixel_values"], inputs["image_grid_thw"], NUM_TOKENS, method, **options)
    if "pixel_values_videos" in inputs:
        videos = reference_items(
            model, inputs["pixel_values_videos"], inputs["video_grid_thw"], NUM_TOKENS, method, per_video, **options
        )
    rows = reference_rows(model, inputs, images, videos)
    vispruner.apply(model, NUM_TOKENS, method=method, budget="per_image" if per_video else "per_crop", **options)
    return model, inputs, images + videos, rows


def generated(model, inputs, **options):
    out = model.generate(**inputs, max_new_tokens=STEPS, **({"do_sample": False} | options))
    return out[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_signal_equals_an_eager_recompute(family):
    model = BUILDERS[family]()
    inputs = tiny_glm_inputs(IMAGES)
    expected, features, keys, _, _ = tower_signals(model, inputs["pixel_values"], inputs["image_grid_thw"])
    with GlmVision(model).tap(IMAGE, {"image_grid_thw": inputs["image_grid_thw"]}, frozenset({"attention", "keys"})) as tap:
        seen = {}
        handle = tap.module.register_forward_pre_hook(lambda module, args: seen.update(inputs=args))
        with torch.no_grad():
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        handle.remove()
    torch.testing.assert_close(tap.attention(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tap.keys(), keys, rtol=1e-5, atol=1e-6)
    assert torch.equal(tap.features(seen["inputs"]), features)
    assert features.shape == (expected.shape[0], model.config.vision_config.out_hidden_size)  # the conv's output


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [IMAGES, VIDEOS], ids=["images", "videos"])
def test_keeping_every_token_is_bit_for_bit_the_stock_model(family, prompts):
    model = BUILDERS[family]()
    inputs = tiny_glm_inputs(prompts)
    with torch.no_grad():
        stock_logits = model(**inputs).logits
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    vispruner.apply(model, num_tokens=64)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, stock_logits)
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)
    assert all(selection.keep.all() for selection in vispruner.last_selection(model))


@pytest.mark.parametrize(("family", "method"), [(f, m) for f in FAMILIES for m in VISION_METHODS])
def test_language_model_receives_text_and_kept_tokens(family, method):
    model, inputs, items, rows = prepared(family, method=method)
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])
        seen.setdefault("mask", kwargs["attention_mask"])
        seen.setdefault("positions", kwargs["position_ids"])

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    assert seen["embeds"].shape[1] < inputs["input_ids"].shape[1]
    for index, row in enumerate(rows):
        real = seen["mask"][index].bool()
        torch.testing.assert_close(seen["embeds"][index][real], row.embeds, rtol=1e-4, atol=1e-5)
        assert torch.equal(seen["positions"][1:, index][:, real], row.positions)
    for selection, item in zip(vispruner.last_selection(model), items, strict=True):
        assert torch.equal(selection.keep, item.keep)
        if item.important is not None:
            assert torch.equal(selection.important, item.important)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("attn_implementation", "options"),
    [("sdpa", {}), ("eager", {}), ("sdpa", {"cache_implementation": "static"}), ("sdpa", {"use_cache": False})],
    ids=["dynamic-cache", "eager", "static-cache", "no-cache"],
)
def test_greedy_tokens_match_reference(family, attn_implementation, options):
    model, inputs, _, rows = prepared(family, attn_implementation=attn_implementation)
    assert generated(model, inputs, **options) == [greedy(model, row, STEPS) for row in rows]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_video", [False, True], ids=["per-group", "per-video"])
def test_videos(family, per_video):
    model, inputs, items, rows = prepared(family, VIDEOS, per_video=per_video)
    assert generated(model, inputs) == [greedy(model, row, STEPS) for row in rows]
    selections = vispruner.last_selection(model)
    assert [s.modality for s in selections] == ["video", "video"]
    first = selections[0]
    assert first.keep.shape == (3, 4) and first.grid == (2, 2)
    # 3 tokens over 3 temporal groups: one each; over the whole video: 3 in all.
    assert int(first.keep.sum()) == 3
    if not per_video:
        assert first.keep.sum(dim=1).tolist() == [1, 1, 1]


#: One image per prompt: the stock generate() copies these rightly for beams and several sequences.
ONE_EACH = [["w1", "w2", ("image", 4, 6), "w3"], [("image", 8, 8), "w4", "w5", "w6"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_and_beams_use_the_gathered_positions(family):
    model, inputs, _, rows = prepared(family, ONE_EACH)
    length = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=True, num_return_sequences=2,
        return_dict_in_generate=True, output_logits=True,
    )
    logits = torch.stack(out.logits, dim=1)
    for index, sequence in enumerate(out.sequences[:, length:]):
        expected = continuation_logits(model, rows[index // 2], sequence.tolist())
        torch.testing.assert_close(logits[index], expected, rtol=1e-4, atol=1e-5)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, length_penalty=0.0,
        do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    for index, sequence in enumerate(out.sequences[:, length:]):
        log_probs = continuation_logits(model, rows[index // 2], sequence.tolist()).log_softmax(dim=-1)
        expected = log_probs[torch.arange(STEPS), sequence].sum()
        torch.testing.assert_close(out.sequences_scores[index], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [IMAGES, VIDEOS], ids=["images", "videos"])
def test_forward_with_labels_and_a_hand_written_decode_loop(family, prompts):
    model, inputs, _, rows = prepared(family, prompts)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill((ids == IMAGE_ID) | (mask == 0) | (mask.cumsum(1) == 1), -100)
    out = model(**inputs, labels=labels, use_cache=True)
    torch.testing.assert_close(out.loss, reference_loss(model, rows, inputs, labels), rtol=1e-5, atol=1e-6)
    next_tokens = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    full_mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
    step = model(input_ids=next_tokens, attention_mask=full_mask, past_key_values=out.past_key_values)
    for row, reference in enumerate(rows):
        expected = continuation_logits(model, reference, [int(next_tokens[row]), 0])
        torch.testing.assert_close(out.logits[row, -1], expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step.logits[row, -1], expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_greedy_tokens_match_a_hand_run_of_the_layers(family):
    model = BUILDERS[family](text_layers=4)
    inputs = tiny_glm_inputs(IMAGES)
    everything = reference_items(model, inputs["pixel_values"], inputs["image_grid_thw"], 10**6, "random")
    rows = reference_rows(model, inputs, everything, [])
    vispruner.apply(model, NUM_TOKENS, method="fastv", layer=2)
    assert generated(model, inputs) == [fastv_greedy(model, row, 2, NUM_TOKENS, STEPS) for row in rows]


@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_videos_in_one_call_are_refused_as_by_the_stock_model(family):
    model = BUILDERS[family]()
    both = tiny_glm_inputs([["w1", ("image", 4, 4), ("video", 2, 4, 4)]])
    for patched in (False, True):
        if patched:
            vispruner.apply(model, NUM_TOKENS)
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            model.generate(**both, max_new_tokens=1, do_sample=False)


@pytest.mark.parametrize(
    ("prompts", "options"),
    [(IMAGES, {"num_beams": 2}), (IMAGES, {"do_sample": True, "num_return_sequences": 2}), (VIDEOS, {"num_beams": 2})],
    ids=["beams-two-images", "sequences-two-images", "beams-video"],
)
def test_copies_the_stock_generate_would_scramble_are_refused(prompts, options):
    model = BUILDERS["glm4v"]()
    inputs = tiny_glm_inputs(prompts)
    stock = model.generate(**inputs, max_new_tokens=1, do_sample=False) if prompts is IMAGES else None
    vispruner.apply(model, NUM_TOKENS)
    with pytest.raises(NotImplementedError, match=r"(num_beams=2|num_return_sequences=2) with a prompt holding several"):
        model.generate(**inputs, max_new_tokens=1, **options)
    if stock is not None:  # one sequence per prompt stays served
        assert model.generate(**inputs, max_new_tokens=1, do_sample=False).shape == stock.shape


def test_video_placeholders_need_mm_token_type_ids():
    model = BUILDERS["glm4v"]()
    inputs = dict(tiny_glm_inputs(VIDEOS))
    del inputs["mm_token_type_ids"]
    vispruner.apply(model, NUM_TOKENS)
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_stock_model(family):
    model = BUILDERS[family]()
    inputs = tiny_glm_inputs(IMAGES)
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    before = [set(vars(owner)) for owner in (model, model.model)]
    vispruner.apply(model, 2)
    assert model.generate(**inputs, max_new_tokens=STEPS, do_sample=False).shape == stock.shape
    vispruner.remove(model)
    assert [set(vars(owner)) for owner in (model, model.model)] == before
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)


def test_the_stock_generate_gives_copies_of_a_two_image_prompt_the_wrong_images():
    """Why the refusal above exists: if this starts failing, transformers copies them rightly and
    the refusal (Family.repeats_wrongly) can go."""
    model = BUILDERS["glm4v"]()
    inputs = tiny_glm_inputs(IMAGES)  # the second prompt holds two images
    own = generated(model, inputs)
    copies = generated(model, inputs, do_sample=True, top_k=1, num_return_sequences=2)  # greedy, twice
    assert copies[0] == copies[1] == own[0]  # one image: copied rightly
    assert copies[2] != own[1] or copies[3] != own[1]
