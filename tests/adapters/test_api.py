"""apply / remove / pruned / last_selection: per instance, reversible, exact when nothing is pruned."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

import vispruner
from vispruner.methods import available_methods, get_method

from .cases import FAMILIES, model_and_inputs
from .reference import _crops, reference_images, vision_signals

PATCHED = ("forward", "generate", "create_masks_for_generate")


def run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return logits, tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_patch_is_bit_for_bit_the_stock_model(family):
    model, inputs = model_and_inputs(family)
    stock_logits, stock_tokens = run(model, inputs)
    vispruner.apply(model, num_tokens=64)  # 64 = every patch of a crop
    logits, tokens = run(model, inputs)
    assert torch.equal(logits, stock_logits) and torch.equal(tokens, stock_tokens)
    assert all(selection.keep.all() for selection in vispruner.last_selection(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_instance_exactly(family):
    model, inputs = model_and_inputs(family)
    stock_logits, stock_tokens = run(model, inputs)
    signature = inspect.signature(model.forward)
    before = dict(vars(model))
    vispruner.apply(model, num_tokens=4)
    assert inspect.signature(model.forward) == signature  # generate inspects it
    pruned_logits, _ = run(model, inputs)
    assert pruned_logits.shape[1] < stock_logits.shape[1]
    assert vispruner.remove(model) is model
    assert vars(model).keys() == before.keys()
    assert "get_image_features" not in vars(model.model)
    logits, tokens = run(model, inputs)
    assert torch.equal(logits, stock_logits) and torch.equal(tokens, stock_tokens)
    vispruner.remove(model)  # removing twice is harmless


def instance_state(model) -> dict:
    """Every submodule's instance attributes (by identity) and the hooks registered on it."""
    state = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            hooks = tuple(value.items()) if isinstance(value, dict) and "hook" in key else None
            state[name, key] = (id(value), hooks)
    return state


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", available_methods())
def test_remove_leaves_no_attribute_or_hook_behind(family, method):
    model, inputs = model_and_inputs(family)
    model.generate(**inputs, max_new_tokens=2)  # whatever a run sets lazily is set before the snapshot
    before = instance_state(model)
    options = {"layer": 1} if get_method(method).stage == "llm" else {}  # two decoder layers
    vispruner.apply(model, num_tokens=4, method=method, **options)
    assert instance_state(model) != before
    model.generate(**inputs, max_new_tokens=2)
    vispruner.remove(model)
    after = instance_state(model)
    assert sorted(set(after) ^ set(before)) == []
    assert [key for key in before if after[key] != before[key]] == []


def test_patching_is_per_instance_and_never_on_the_class():
    patched, inputs = model_and_inputs("llava")
    other, _ = model_and_inputs("llava")
    class_attributes = {name: LlavaForConditionalGeneration.__dict__.get(name) for name in PATCHED}
    stock_logits, _ = run(other, inputs)
    vispruner.apply(patched, num_tokens=4)
    assert all(name in vars(patched) for name in PATCHED)
    assert {name: LlavaForConditionalGeneration.__dict__.get(name) for name in PATCHED} == class_attributes
    logits, _ = run(other, inputs)
    assert torch.equal(logits, stock_logits)


def test_an_earlier_instance_attribute_comes_back_after_remove():
    model, inputs = model_and_inputs("llava")
    calls = []
    stock_forward = model.forward

    @functools.wraps(stock_forward)
    def user_forward(*args, **kwargs):
        calls.append(1)
        return stock_forward(*args, **kwargs)

    model.forward = user_forward
    vispruner.apply(model, num_tokens=4)
    run(model, inputs)
    assert calls, "the patch must wrap what the instance already had"
    vispruner.remove(model)
    assert model.forward is user_forward


def test_apply_again_replaces_and_pruned_scopes():
    model, inputs = model_and_inputs("llava")
    vispruner.apply(model, num_tokens=16)
    vispruner.apply(model, num_tokens=8)
    run(model, inputs)
    assert [int(s.keep.sum()) for s in vispruner.last_selection(model)] == [8, 8, 8]
    with vispruner.pruned(model, num_tokens=4) as scoped:
        assert scoped is model
        run(model, inputs)
        assert [int(s.keep.sum()) for s in vispruner.last_selection(model)] == [4, 4, 4]
    run(model, inputs)
    assert [int(s.keep.sum()) for s in vispruner.last_selection(model)] == [8, 8, 8]
    vispruner.remove(model)
    with vispruner.pruned(model, num_tokens=4):
        pass
    assert "forward" not in vars(model)


def test_last_selection_parts():
    model, inputs = model_and_inputs("llava_next")
    crops = _crops(model, inputs["pixel_values"], inputs["image_sizes"])
    _, attention, _ = vision_signals(model, torch.cat(crops), need_keys=False)
    image = reference_images(model, inputs["pixel_values"], inputs["image_sizes"], 6)[2]
    vispruner.apply(model, num_tokens=6, important_ratio=0.5)
    assert vispruner.last_selection(model) is None
    run(model, inputs)
    selection = vispruner.last_selection(model)[2]  # the 2x2 image: base + 4 crops
    assert selection.keep.shape == (5, 64) and selection.grid == (8, 8)
    scores = attention[-5:]  # the last image's crops
    parts = zip(selection.indices, selection.important_indices, selection.diverse_indices, strict=True)
    for crop, (kept, important, diverse) in enumerate(parts):
        top = sorted(sorted(range(64), key=lambda patch: -float(scores[crop, patch]))[:3])
        assert kept.tolist() == image.keep[crop].nonzero().flatten().tolist()
        assert important.tolist() == top
        assert diverse.tolist() == sorted(set(kept.tolist()) - set(top))


def test_unsupported_models_raise_type_error_listing_families():
    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2))
    for model in (text_only, object()):
        with pytest.raises(TypeError, match=r"LLaVA-1\.5 .*LLaVA-NeXT"):
            vispruner.apply(model)
    model, _ = model_and_inputs("llava")
    with pytest.raises(TypeError, match="LlavaModel"):
        vispruner.apply(model.model)
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(TypeError, match="vision_feature_select_strategy"):
        vispruner.apply(model)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"num_tokens": 0}, "num_tokens must be an integer >= 1"),
        ({"important_ratio": 1.5}, r"important_ratio must be a number in \[0, 1\]"),
        ({"method": "nope"}, "method must be one of"),
        ({"method": "vispruner", "colour": 1}, "unknown option.*colour.*allowed options: important_ratio"),
        ({"method": "divprune", "important_ratio": 0.75}, "important_ratio is an option of methods .*vispruner"),
        ({"budget": "per_pixel"}, "budget must be one of 'per_crop', 'per_image'"),
        ({"num_tokens": 8, "keep_ratio": 0.5}, "give num_tokens or keep_ratio, not both"),
        ({"keep_ratio": 0}, r"keep_ratio must be a number in \(0, 1\]"),
        ({"keep_ratio": 1.5}, r"keep_ratio must be a number in \(0, 1\]"),
        # Each method's options are checked against their declared ranges at apply, not at the first forward.
        ({"method": "random", "seed": -1}, r"seed must be an integer in \[0, 2\*\*63 - 1\]; got -1"),
        ({"method": "random", "seed": 1.5}, r"seed must be an integer"),
        ({"method": "visionzip", "contextual_ratio": 2.0}, r"contextual_ratio must be a number in \[0, 1\]; got 2.0"),
        ({"method": "fastv", "layer": 0}, r"layer must be an integer >= 1; got 0"),
        ({"method": "fastv", "layer": 9}, r"layer must be an integer in \[1, \d+\]"),
    ],
)
def test_bad_arguments_raise_value_error_and_leave_the_model_alone(arguments, message):
    model, _ = model_and_inputs("llava")
    with pytest.raises(ValueError, match=message):
        vispruner.apply(model, **arguments)
    assert "forward" not in vars(model)


@pytest.mark.parametrize(
    ("options", "name"),
    [({"prompt_lookup_num_tokens": 2}, "prompt_lookup_num_tokens"), ({"prefill_chunk_size": 16}, "prefill_chunk_size")],
)
def test_generate_modes_that_cannot_follow_a_pruned_cache_raise(options, name):
    model, inputs = model_and_inputs("llava", texts=["w1 <image> w2"])
    vispruner.apply(model, num_tokens=4)
    with pytest.raises(NotImplementedError, match=name):
        model.generate(**inputs, max_new_tokens=2, **options)
    # Text-only prompts are not pruned, so nothing stands in their way.
    model.generate(input_ids=inputs["input_ids"][:, -1:], max_new_tokens=2, **options)


def test_features_computed_before_patching_are_refused():
    model, inputs = model_and_inputs("llava")
    stock = model.model.get_image_features(pixel_values=inputs["pixel_values"])
    vispruner.apply(model, num_tokens=4)
    with pytest.raises(ValueError, match="computed without vispruner"):
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], mm_encoder_outputs={"image": stock})
