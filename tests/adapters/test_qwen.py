"""Pruned Qwen2-VL / Qwen2.5-VL against the step-by-step reference (see reference_qwen.py).

Batches are left padded, with prompts of different lengths, several images of different sizes
in one row, and videos of several temporal groups.
"""

from __future__ import annotations

import pytest
import torch

import vispruner
from vispruner.adapters.qwen_vision import IMAGE, QwenVision
from vispruner.methods import available_methods, get_method

from ..tiny_glm import BUILDERS as GLM_BUILDERS
from ..tiny_glm import tiny_glm_inputs
from ..tiny_qwen import BUILDERS, IMAGE_ID, MIXED_PROMPTS, family_inputs
from .reference_qwen import (
    continuation_logits,
    fastv_greedy,
    greedy,
    reference_items,
    reference_loss,
    reference_rows,
    tower_signals,
)

FAMILIES = tuple(BUILDERS)
#: The window-ordered tower and the deepstack one: where the full matrices run.
CORE = ("qwen2_5_vl", "qwen3_vl")
NUM_TOKENS = 3
STEPS = 4
IMAGES = [["w1", "w2", ("image", 4, 6), "w3"], [("image", 8, 8), "w4", ("image", 4, 4), "w5", "w6"]]
# cdpruner selects by each row's instruction, which these references do not carry; its own
# reference is tests/adapters/test_cdpruner_apply.py.
VISION_METHODS = [name for name in available_methods() if get_method(name).stage == "vision" and name != "cdpruner"]


def model_and_inputs(family, prompts, **build):
    """A tiny model of ``family`` (a Qwen-VL one, or GLM-4.1V / 4.5V, whose tests call these with
    their own prompts) and ``prompts`` laid out as its processor does."""
    if family in GLM_BUILDERS:
        return GLM_BUILDERS[family](**build), tiny_glm_inputs(prompts)
    return BUILDERS[family](**build), family_inputs(family, prompts)


def prepared(family, prompts=IMAGES, method="vispruner", attn_implementation="sdpa", per_video=False, **options):
    model, inputs = model_and_inputs(family, prompts, attn_implementation=attn_implementation)
    images = videos = []
    if "pixel_values" in inputs:
        images = reference_items(model, inputs["pixel_values"], inputs["image_grid_thw"], NUM_TOKENS, method, **options)
    if "pixel_values_videos" in inputs:
        videos = reference_items(
            model, inputs["pixel_values_videos"], inputs["video_grid_thw"], NUM_TOKENS, method, per_video, **options
        )
    rows = reference_rows(model, inputs, images, videos)
    budget = "per_image" if per_video else "per_crop"
    vispruner.apply(model, NUM_TOKENS, method=method, budget=budget, **options)
    return model, inputs, images + videos, rows


def prompt_length(inputs):
    return inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_signal_equals_an_eager_recompute(family, vision=QwenVision):
    model, inputs = model_and_inputs(family, IMAGES)
    expected, features, keys, _, _ = tower_signals(model, inputs["pixel_values"], inputs["image_grid_thw"])
    arguments = {"image_grid_thw": inputs["image_grid_thw"]}
    with vision(model).tap(IMAGE, arguments, frozenset({"attention", "keys"})) as tap:
        seen = {}
        handle = tap.module.register_forward_pre_hook(lambda module, args: seen.update(inputs=args))
        with torch.no_grad():
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        handle.remove()
    torch.testing.assert_close(tap.attention(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tap.keys(), keys, rtol=1e-5, atol=1e-6)
    assert torch.equal(tap.features(seen["inputs"]), features)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_token_is_bit_for_bit_the_stock_model(family, prompts=MIXED_PROMPTS):
    model, inputs = model_and_inputs(family, prompts)
    with torch.no_grad():
        stock_logits = model(**inputs).logits
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    vispruner.apply(model, num_tokens=64)  # at least every merged token of every image and group
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.equal(logits, stock_logits)
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)
    assert all(selection.keep.all() for selection in vispruner.last_selection(model))


@pytest.mark.parametrize(
    ("family", "method"), [(f, m) for f in CORE for m in VISION_METHODS] + [(f, "vispruner") for f in FAMILIES if f not in CORE]
)
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
    assert seen["embeds"].shape[1] < prompt_length(inputs)
    for index, row in enumerate(rows):
        real = seen["mask"][index].bool()
        torch.testing.assert_close(seen["embeds"][index][real], row.embeds, rtol=1e-4, atol=1e-5)
        assert torch.equal(seen["positions"][1:, index][:, real], row.positions)
    for selection, item in zip(vispruner.last_selection(model), items, strict=True):
        assert torch.equal(selection.keep, item.keep)
        if item.important is not None:
            assert torch.equal(selection.important, item.important)


@pytest.mark.parametrize("family", CORE)
@pytest.mark.parametrize(
    ("attn_implementation", "options"),
    [("sdpa", {}), ("eager", {}), ("sdpa", {"cache_implementation": "static"}), ("sdpa", {"use_cache": False})],
    ids=["dynamic-cache", "eager", "static-cache", "no-cache"],
)
def test_greedy_tokens_match_reference(family, attn_implementation, options):
    model, inputs, _, rows = prepared(family, attn_implementation=attn_implementation)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **options)
    assert out[:, prompt_length(inputs) :].tolist() == [greedy(model, row, STEPS) for row in rows]


@pytest.mark.parametrize(("family", "per_video"), [(f, False) for f in FAMILIES] + [(f, True) for f in CORE])
def test_video_and_images_mixed(family, per_video, prompts=MIXED_PROMPTS):
    """(The first video of ``prompts`` has 3 temporal groups of 2 x 2 merged tokens.)"""
    model, inputs, items, rows = prepared(family, prompts, per_video=per_video)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert out[:, prompt_length(inputs) :].tolist() == [greedy(model, row, STEPS) for row in rows]
    selections = vispruner.last_selection(model)
    given = [part[0] for prompt in prompts for part in prompt if isinstance(part, tuple)]
    assert [s.modality for s in selections] == sorted(given, key=["image", "video"].index)
    video = next(s for s in selections if s.modality == "video")
    assert video.keep.shape == (3, 4) and video.grid == (2, 2)
    # 3 tokens over 3 temporal groups: one each; over the whole video: 3 in all.
    assert int(video.keep.sum()) == 3
    if not per_video:
        assert video.keep.sum(dim=1).tolist() == [1, 1, 1]


def stock_generate_repeats_rows_right(family) -> bool:
    """Whether the unpatched model's first sampled logits with ``num_return_sequences=2`` equal its
    forward's (transformers 5.19 gets them wrong for Qwen3.5 with no pruning at all; docs/compatibility.md)."""
    model, inputs = BUILDERS[family](), family_inputs(family, IMAGES)
    with torch.no_grad():
        expected = model(**inputs).logits[:, -1].repeat_interleave(2, dim=0)
    out = model.generate(
        **inputs, max_new_tokens=1, do_sample=True, num_return_sequences=2, return_dict_in_generate=True, output_logits=True
    )
    return torch.allclose(out.logits[0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_and_beams_use_the_gathered_positions(family, prompts=IMAGES):
    if family in ("qwen3_5", "qwen3_5_moe") and not stock_generate_repeats_rows_right(family):
        import transformers

        pytest.skip(f"transformers {transformers.__version__}'s own Qwen3.5 generate() is wrong with num_return_sequences")
    model, inputs, _, rows = prepared(family, prompts)
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=True, num_return_sequences=2,
        return_dict_in_generate=True, output_logits=True,
    )
    logits = torch.stack(out.logits, dim=1)
    for index, sequence in enumerate(out.sequences[:, prompt_length(inputs) :]):
        expected = continuation_logits(model, rows[index // 2], sequence.tolist())
        torch.testing.assert_close(logits[index], expected, rtol=1e-4, atol=1e-5)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, length_penalty=0.0,
        do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    for index, sequence in enumerate(out.sequences[:, prompt_length(inputs) :]):
        log_probs = continuation_logits(model, rows[index // 2], sequence.tolist()).log_softmax(dim=-1)
        expected = log_probs[torch.arange(STEPS), sequence].sum()
        torch.testing.assert_close(out.sequences_scores[index], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_with_labels_and_a_hand_written_decode_loop(family, prompts=IMAGES):
    model, inputs, _, rows = prepared(family, prompts)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = ids.masked_fill((ids == IMAGE_ID) | (mask == 0) | (mask.cumsum(1) == 1), -100)
    out = model(**inputs, labels=labels, use_cache=True)
    torch.testing.assert_close(out.loss, reference_loss(model, rows, inputs, labels), rtol=1e-5, atol=1e-6)
    next_tokens = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    # The caller keeps the full-length mask and passes no positions, as for the unpruned model.
    full_mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
    step = model(input_ids=next_tokens, attention_mask=full_mask, past_key_values=out.past_key_values)
    for row, reference in enumerate(rows):
        expected = continuation_logits(model, reference, [int(next_tokens[row]), 0])
        torch.testing.assert_close(out.logits[row, -1], expected[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step.logits[row, -1], expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_hand_written_decode_loop_without_a_mask(family):
    # generate() always passes a mask; a user's own loop over one unpadded prompt may pass none, so
    # the step's text positions come from the cache length and the tokens pruned from the prompt.
    model, inputs, _, (row,) = prepared(family, prompts=[["w1", ("image", 4, 4), "w2", "w3"]])
    assert inputs["attention_mask"].all()
    prompt = {name: value for name, value in inputs.items() if name != "attention_mask"}
    with torch.no_grad():
        out = model(**prompt, use_cache=True)
        cache, tokens, logits = out.past_key_values, [int(out.logits[0, -1].argmax())], [out.logits[0, -1]]
        # The inputs reach the branch without a mask: pruning shortened the cached prompt, and the
        # prefill left rope_deltas for the steps to continue from.
        assert len(row.embeds) < prompt_length(inputs) and model.model.rope_deltas is not None
        for _ in range(2):
            step = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache)
            cache = step.past_key_values
            logits.append(step.logits[0, -1])
            tokens.append(int(step.logits[0, -1].argmax()))
    expected = continuation_logits(model, row, tokens)
    torch.testing.assert_close(torch.stack(logits), expected, rtol=1e-4, atol=1e-5)


def test_keep_ratio_share_of_each_image():
    model = BUILDERS["qwen2_5_vl"]()
    inputs = family_inputs("qwen2_5_vl", IMAGES)
    vispruner.apply(model, keep_ratio=0.3)
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    # 0.3 x (6, 16, 4) tokens = 1.8, 4.8, 1.2 -> 2, 5, 1 (half up, at least 1).
    assert [int(s.keep.sum()) for s in vispruner.last_selection(model)] == [2, 5, 1]


def test_fastv_cut_before_a_deepstack_layer_adds_features_to_kept_tokens_only():
    # Deepstack features are added after decoder layers 0 and 1; the cut is before layer 1.
    model = BUILDERS["qwen3_vl"](text_layers=3)
    inputs = family_inputs("qwen3_vl", MIXED_PROMPTS)
    added = []
    stock = model.model.language_model._deepstack_process

    def spy(hidden_states, visual_pos_masks, visual_embeds):
        added.append((hidden_states.shape[1], int(visual_pos_masks.sum()), visual_embeds.shape[0]))
        return stock(hidden_states, visual_pos_masks, visual_embeds)

    model.model.language_model._deepstack_process = spy
    vispruner.apply(model, 2, method="fastv", layer=1)
    model(**inputs)
    full = inputs["input_ids"].shape[1]
    visual = int(((inputs["input_ids"] == IMAGE_ID) | (inputs["input_ids"] == 6)).sum())
    (length0, masked0, rows0), (length1, masked1, rows1) = added
    assert (length0, masked0, rows0) == (full, visual, visual)
    kept = sum(int(s.keep.sum()) for s in vispruner.last_selection(model))
    assert length1 < full and masked1 == rows1 == kept


@pytest.mark.parametrize("family", CORE)
def test_fastv_greedy_tokens_match_a_hand_run_of_the_layers(family):
    model, inputs = model_and_inputs(family, IMAGES, text_layers=4)
    everything = reference_items(model, inputs["pixel_values"], inputs["image_grid_thw"], 10**6, "random")
    rows = reference_rows(model, inputs, everything, [])
    vispruner.apply(model, NUM_TOKENS, method="fastv", layer=2)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert out[:, prompt_length(inputs) :].tolist() == [fastv_greedy(model, row, 2, NUM_TOKENS, STEPS) for row in rows]
