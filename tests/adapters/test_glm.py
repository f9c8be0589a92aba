"""Pruned GLM-4.1V / GLM-4.5V against the step-by-step reference (see reference_qwen.py).

Batches are left padded, with prompts of different lengths, several images of different sizes
in one row, and videos of several temporal groups (in their own batches: the stock models take
images and videos in separate calls). The checks are tests/adapters/test_qwen.py's, called
with GLM's models and prompts; what is GLM's own is here.
"""

from __future__ import annotations

import pytest
import torch

import vispruner
from vispruner.adapters.glm4v import GlmVision

from ..tiny_glm import BUILDERS, IMAGES, VIDEOS, tiny_glm_inputs
from . import test_qwen as qwen

FAMILIES = tuple(BUILDERS)
NUM_TOKENS = qwen.NUM_TOKENS
STEPS = qwen.STEPS
#: One image per prompt: the stock generate() copies these rightly for beams and several sequences.
ONE_EACH = [["w1", "w2", ("image", 4, 6), "w3"], [("image", 8, 8), "w4", "w5", "w6"]]


def generated(model, inputs, **options):
    out = model.generate(**inputs, max_new_tokens=STEPS, **({"do_sample": False} | options))
    return out[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_signal_equals_an_eager_recompute(family):
    # Features: the merger's input, one row per token (the conv's output), as the reference reads it.
    qwen.test_signal_equals_an_eager_recompute(family, vision=GlmVision)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [IMAGES, VIDEOS], ids=["images", "videos"])
def test_keeping_every_token_is_bit_for_bit_the_stock_model(family, prompts):
    qwen.test_keeping_every_token_is_bit_for_bit_the_stock_model(family, prompts)


@pytest.mark.parametrize(("family", "method"), [(f, m) for f in FAMILIES for m in qwen.VISION_METHODS])
def test_language_model_receives_text_and_kept_tokens(family, method):
    qwen.test_language_model_receives_text_and_kept_tokens(family, method)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("attn_implementation", "options"),
    [("sdpa", {}), ("eager", {}), ("sdpa", {"cache_implementation": "static"}), ("sdpa", {"use_cache": False})],
    ids=["dynamic-cache", "eager", "static-cache", "no-cache"],
)
def test_greedy_tokens_match_reference(family, attn_implementation, options):
    qwen.test_greedy_tokens_match_reference(family, attn_implementation, options)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_video", [False, True], ids=["per-group", "per-video"])
def test_videos(family, per_video):
    qwen.test_video_and_images_mixed(family, per_video, prompts=VIDEOS)


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_and_beams_use_the_gathered_positions(family):
    qwen.test_sampling_and_beams_use_the_gathered_positions(family, prompts=ONE_EACH)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompts", [IMAGES, VIDEOS], ids=["images", "videos"])
def test_forward_with_labels_and_a_hand_written_decode_loop(family, prompts):
    qwen.test_forward_with_labels_and_a_hand_written_decode_loop(family, prompts)


@pytest.mark.parametrize("family", FAMILIES)
def test_fastv_greedy_tokens_match_a_hand_run_of_the_layers(family):
    qwen.test_fastv_greedy_tokens_match_a_hand_run_of_the_layers(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_videos_in_one_call_are_refused_as_by_the_stock_model(family):
    model = BUILDERS[family]()
    both = tiny_glm_inputs([["w1", ("image", 4, 4), ("video", 2, 4, 4)]])
    for patched in (False, True):
        if patched:
            vispruner.apply(model, NUM_TOKENS)
        with pytest.raises(ValueError, match="Image features and image tokens do not match"):
            model.generate(**both, max_new_tokens=1, do_sample=False)


@pytest.mark.parametrize("method", ["vispruner", "fastv"])
@pytest.mark.parametrize(
    ("prompts", "options"),
    [(IMAGES, {"num_beams": 2}), (IMAGES, {"do_sample": True, "num_return_sequences": 2}), (VIDEOS, {"num_beams": 2})],
    ids=["beams-two-images", "sequences-two-images", "beams-video"],
)
def test_copies_the_stock_generate_would_scramble_are_refused(prompts, options, method):
    model = BUILDERS["glm4v"](text_layers=4)
    inputs = tiny_glm_inputs(prompts)
    stock = model.generate(**inputs, max_new_tokens=1, do_sample=False) if prompts is IMAGES else None
    vispruner.apply(model, NUM_TOKENS, method=method)
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
@pytest.mark.parametrize("method", ["vispruner", "fastv"])
def test_remove_restores_the_stock_model(family, method):
    model = BUILDERS[family](text_layers=4)
    inputs = tiny_glm_inputs(IMAGES)
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    owners = (model, model.model, model.model.language_model)
    before = [set(vars(owner)) for owner in owners]
    vispruner.apply(model, 2, method=method)
    assert model.generate(**inputs, max_new_tokens=STEPS, do_sample=False).shape == stock.shape
    vispruner.remove(model)
    assert [set(vars(owner)) for owner in owners] == before
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


def test_fastv_tells_video_frames_from_images_by_token_type():
    """Video frames use the image token: after a call with images, a call with videos must not
    take its frames for images (the LLM stage keeps each modality's last items)."""
    def videos_after(images_first):
        model = BUILDERS["glm4v"](text_layers=4)
        vispruner.apply(model, 2, method="fastv", layer=2)
        if images_first:
            model.generate(**tiny_glm_inputs(IMAGES), max_new_tokens=1, do_sample=False)
        tokens = generated(model, tiny_glm_inputs(VIDEOS))
        return tokens, [selection.modality for selection in vispruner.last_selection(model)]

    assert videos_after(True) == videos_after(False)
    assert videos_after(True)[1] == ["video", "video"]
