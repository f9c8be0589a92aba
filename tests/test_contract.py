"""The contract every registered method keeps through ``vispruner.apply``, on every model family
(one parametrized test, method x family).

* Keeping every token reproduces the unpatched model exactly.
* Batched generation runs (left padding, prompts of different lengths, two images in a prompt).
* The language model sees the text and exactly the kept image tokens: ``num_tokens`` per crop
  (LLaVA-NeXT: those of them unpadding leaves, plus the newline tokens); for an LLM-stage
  method (FastV), layers before its cut see the whole prompt and the later ones the kept tokens.

Expected counts come from the image layout worked out by hand in tests/adapters/reference.py,
not from the adapters.
"""

from __future__ import annotations

import functools

import pytest
import torch

import vispruner
from vispruner.methods import available_methods, get_method

from . import tiny_gemma4
from .adapters import cases, siglip_cases, tile_cases
from .adapters.cases import FAMILIES
from .adapters.reference import image_layouts
from .adapters.reference_gemma4 import gemma4_items, gemma4_rows
from .tiny_glm import BUILDERS as GLM_BUILDERS
from .tiny_glm import IMAGES as GLM_IMAGES
from .tiny_glm import VIDEOS as GLM_VIDEOS
from .tiny_glm import tiny_glm_inputs as glm_inputs
from .tiny_qwen import BUILDERS as QWEN_BUILDERS
from .tiny_qwen import IMAGE_ID as QWEN_IMAGE_ID
from .tiny_qwen import MIXED_PROMPTS as QWEN_PROMPTS
from .tiny_qwen import VIDEO_ID as QWEN_VIDEO_ID
from .tiny_qwen import family_inputs as qwen_inputs

NUM_TOKENS = 5
STEPS = 3
#: Four decoder layers, so that FastV's default cut (before layer 2) has layers on both sides.
TEXT_LAYERS = 4
FASTV_LAYER = 2
model_and_inputs = functools.partial(cases.model_and_inputs, text_layers=TEXT_LAYERS)


def generate(model, inputs):
    return model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True
    )


def assert_keeping_everything_is_stock(model, inputs, method):
    stock = generate(model, inputs)
    vispruner.apply(model, 10**6, method=method)
    everything = generate(model, inputs)
    assert torch.equal(everything.sequences, stock.sequences)
    for mine, theirs in zip(everything.logits, stock.logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def rows_of_images(model, inputs) -> list[list[int]]:
    """The images (indices in reading order) of each row."""
    image_id = model.config.image_token_id
    rows, count = [], 0
    for ids in inputs["input_ids"].tolist():
        starts = sum(1 for i, token in enumerate(ids) if token == image_id and (i == 0 or ids[i - 1] != image_id))
        rows.append(list(range(count, count + starts)))
        count += starts
    return rows


def text_counts(model, inputs) -> list[int]:
    real = inputs["attention_mask"].bool()
    return (real & (inputs["input_ids"] != model.config.image_token_id)).sum(dim=1).tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", available_methods())
def test_method_through_apply(family, method):
    model, inputs = model_and_inputs(family)
    assert_keeping_everything_is_stock(model, inputs, method)

    vispruner.apply(model, NUM_TOKENS, method=method)
    stage = get_method(method).stage
    seen: dict[int, list[int]] = {}

    def record(index):
        def hook(module, args, kwargs):
            if index not in seen:  # the prefill
                hidden = args[0] if args else kwargs["hidden_states"]
                mask = kwargs["attention_mask"]
                # The last query of a left-padded row attends to exactly the row's real tokens.
                seen[index] = [hidden.shape[1]] * hidden.shape[0] if mask is None else mask[:, 0, -1].sum(-1).tolist()
        return hook

    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + STEPS)

    layouts = image_layouts(model, inputs)
    selections = vispruner.last_selection(model)
    kept_tokens = []
    for layout, selection in zip(layouts, selections, strict=True):
        crops, patches = selection.keep.shape
        in_prompt = [sum(1 for item in layout if item is not None and item[0] == c) for c in range(crops)]
        kept_per_crop = [
            sum(1 for item in layout if item is not None and item[0] == c and selection.keep[item]) for c in range(crops)
        ]
        if stage == "vision":
            assert selection.keep.sum(dim=1).tolist() == [min(NUM_TOKENS, patches)] * crops
        else:  # FastV chooses among the tokens the language model received
            assert kept_per_crop == [min(NUM_TOKENS, count) for count in in_prompt]
        kept_tokens.append(sum(kept_per_crop) + sum(1 for item in layout if item is None))
    images_of_rows = rows_of_images(model, inputs)
    expected = [text + sum(kept_tokens[i] for i in images) for text, images in zip(text_counts(model, inputs), images_of_rows)]
    full = inputs["attention_mask"].sum(dim=1).tolist()
    cut = FASTV_LAYER if stage == "llm" else 0
    assert all(seen[i] == full for i in range(cut))
    assert all(seen[i] == expected for i in range(cut, len(layers)))
    assert all(e < f for e, f in zip(expected, full))


def generate_seeing_prefill(model, inputs):
    """Greedy ids, and per decoder layer with a 4D mask (softmax attention) the number of tokens each
    row's last query attends to at the prefill: the row's real tokens, for a left-padded batch."""
    seen: dict[int, list[int]] = {}

    def record(index):
        def hook(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if index not in seen and mask is not None and mask.ndim == 4:  # the prefill, softmax layers
                seen[index] = mask[:, 0, -1].sum(-1).tolist()
        return hook

    layers = model.get_decoder().layers
    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def qwen_kept(prompt: list, num_tokens: int) -> int:
    """Merged tokens kept of one prompt's images and videos, worked out from the budget rules."""
    kept = 0
    for part in prompt:
        if isinstance(part, tuple):
            t, h, w = (1, *part[1:]) if part[0] == "image" else part[1:]
            shares = [max(1, num_tokens // t + (i < num_tokens % t)) for i in range(t)]
            kept += sum(min(share, h * w // 4) for share in shares)
    return kept


@pytest.mark.parametrize("family", tuple(QWEN_BUILDERS))
@pytest.mark.parametrize("method", available_methods())
def test_method_through_apply_on_qwen(family, method):
    model = QWEN_BUILDERS[family](text_layers=TEXT_LAYERS)
    inputs = qwen_inputs(family, QWEN_PROMPTS)
    stage = get_method(method).stage
    if stage == "llm" and family in ("qwen3_5", "qwen3_5_moe"):  # linear-attention layers
        with pytest.raises(TypeError, match="softmax attention in every decoder layer"):
            vispruner.apply(model, NUM_TOKENS, method=method)
        return
    assert_qwen_like_contract(model, inputs, QWEN_PROMPTS, method)


@pytest.mark.parametrize("family", tuple(GLM_BUILDERS))
@pytest.mark.parametrize("prompts", [GLM_IMAGES, GLM_VIDEOS], ids=["images", "videos"])
@pytest.mark.parametrize("method", available_methods())
def test_method_through_apply_on_glm(family, prompts, method):
    """GLM-4.1V / 4.5V: images and videos in separate calls, as the stock models take them."""
    model = GLM_BUILDERS[family](text_layers=TEXT_LAYERS)
    assert_qwen_like_contract(model, glm_inputs(prompts), prompts, method)


def assert_qwen_like_contract(model, inputs, prompts, method):
    stage = get_method(method).stage
    assert_keeping_everything_is_stock(model, inputs, method)

    vispruner.apply(model, NUM_TOKENS, method=method)
    _, seen = generate_seeing_prefill(model, inputs)
    visual = (inputs["input_ids"] == QWEN_IMAGE_ID) | (inputs["input_ids"] == QWEN_VIDEO_ID)
    text = (inputs["attention_mask"].bool() & ~visual).sum(dim=1).tolist()
    expected = [count + qwen_kept(prompt, NUM_TOKENS) for count, prompt in zip(text, prompts)]
    full = inputs["attention_mask"].sum(dim=1).tolist()
    cut = FASTV_LAYER if stage == "llm" else 0
    assert seen, "no decoder layer saw the prefill"
    assert all(seen[i] == (full if i < cut else expected) for i in seen)
    assert all(e < f for e, f in zip(expected, full))
    kinds = [selection.modality for selection in vispruner.last_selection(model)]
    given = [part[0] for prompt in prompts for part in prompt if isinstance(part, tuple)]
    assert kinds == sorted(given, key=["image", "video"].index)  # images first, then videos


SIGLIP_CASES = {name: siglip_cases.CASES[name] for name in ("gemma3", "onevision", "onevision_video")}


@functools.cache
def siglip_prompt_lengths(family: str) -> list[int]:
    """Per row, text + kept tokens by the reference; every vision method keeps the same number
    (``num_tokens`` per unit, all of a smaller unit), so one method's reference serves all."""
    model, inputs = SIGLIP_CASES[family]()
    return [len(embeds) for embeds, _ in siglip_cases.reference_rows(model, inputs, "random", NUM_TOKENS)]


@pytest.mark.parametrize("family", SIGLIP_CASES)
@pytest.mark.parametrize("method", available_methods())
def test_method_through_apply_siglip(family, method):
    """The same contract on SigLIP towers (Gemma 3, LLaVA-OneVision images and video); the expected
    prompt lengths come from the step-by-step reference. FastV is refused there."""
    model, inputs = SIGLIP_CASES[family]()
    if get_method(method).stage == "llm":
        with pytest.raises(TypeError, match=method):  # Gemma 3: sliding-window layers; OneVision: its packing
            vispruner.apply(model, NUM_TOKENS, method=method, layer=1)
        return
    expected = siglip_prompt_lengths(family)
    assert_keeping_everything_is_stock(model, inputs, method)

    vispruner.apply(model, NUM_TOKENS, method=method)
    out, rows = siglip_cases.language_inputs(model, inputs)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + siglip_cases.STEPS)
    assert [len(row) for row in rows] == expected
    assert all(e < f for e, f in zip(expected, inputs["attention_mask"].sum(dim=1).tolist()))


@pytest.mark.parametrize("family", tile_cases.CASES)
@pytest.mark.parametrize("method", available_methods())
def test_method_through_apply_new_families(family, method):
    """The contract on the families of issue 23: stock at full budget; the language model sees the
    text and the kept tokens, lengths by the step-by-step reference (FastV keeps as many per unit,
    from its cut on)."""
    case = tile_cases.CASES[family]
    model, inputs = case.build(text_layers=TEXT_LAYERS), case.inputs()
    expected = [len(embeds) for embeds, _ in case.rows(model, inputs, "random", NUM_TOKENS)]
    assert_keeping_everything_is_stock(model, inputs, method)
    vispruner.apply(model, NUM_TOKENS, method=method)
    out, seen = generate_seeing_prefill(model, inputs)
    layers = model.get_decoder().layers
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + STEPS)
    full = inputs["attention_mask"].sum(dim=1).tolist()
    cut = FASTV_LAYER if get_method(method).stage == "llm" else 0
    assert [seen[i] for i in range(len(layers))] == [full] * cut + [expected] * (len(layers) - cut)
    assert all(e < f for e, f in zip(expected, full))


GEMMA4_BATCHES = {"images": tiny_gemma4.PROMPTS, "videos": tiny_gemma4.VIDEO_PROMPTS}


@functools.cache
def gemma4_prompt_lengths(batch: str) -> list[int]:
    """Per row, text + kept tokens by the reference (every vision method keeps as many)."""
    model, inputs = tiny_gemma4.tiny_gemma4(text_layers=TEXT_LAYERS), tiny_gemma4.gemma4_inputs(GEMMA4_BATCHES[batch])
    return [len(embeds) for embeds, _ in gemma4_rows(model, inputs, gemma4_items(model, inputs, "random", NUM_TOKENS))]


@pytest.mark.parametrize("family", ["gemma4"])
@pytest.mark.parametrize("batch", GEMMA4_BATCHES)
@pytest.mark.parametrize("method", available_methods())
def test_method_through_apply_on_gemma4(family, batch, method):
    """Gemma 4 (images of different sizes, two in a prompt; videos): stock at full budget; the
    language model sees the text and the kept tokens, lengths by the step-by-step reference.
    FastV is refused (sliding-window layers)."""
    model = tiny_gemma4.tiny_gemma4(text_layers=TEXT_LAYERS)
    inputs = tiny_gemma4.gemma4_inputs(GEMMA4_BATCHES[batch])
    if get_method(method).stage == "llm":
        with pytest.raises(TypeError, match=f"{method} does not support Gemma 4"):
            vispruner.apply(model, NUM_TOKENS, method=method)
        return
    expected = gemma4_prompt_lengths(batch)
    assert_keeping_everything_is_stock(model, inputs, method)
    vispruner.apply(model, NUM_TOKENS, method=method)
    out, seen = generate_seeing_prefill(model, inputs)
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + STEPS)
    assert seen, "no decoder layer saw the prefill"
    assert all(seen[i] == expected for i in seen)
    assert all(e < f for e, f in zip(expected, inputs["attention_mask"].sum(dim=1).tolist()))
