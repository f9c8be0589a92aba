"""CDPruner through ``apply``: each image is pruned by its own prompt row's instruction, computed
here by hand from the projected tokens and the row's text tokens."""

from __future__ import annotations

import pytest
import torch

import vispruner
from vispruner.methods.cdpruner import cdpruner_selection
from tests.tiny_qwen import BUILDERS as QWEN_BUILDERS
from tests.tiny_qwen import family_inputs as qwen_inputs

from .cases import FAMILIES, model_and_inputs
from .reference import _crops, vision_signals

NUM_TOKENS = 5


def expected_keeps(model, inputs, num_tokens):
    """Per image, (crops, N): the variant on the crops of that image together, relevance to the
    input embeddings of its row's tokens other than padding and image placeholders."""
    image_id, pad_id = model.config.image_token_id, model.config.pad_token_id
    crops = _crops(model, inputs["pixel_values"], inputs.get("image_sizes"))
    features, _, _ = vision_signals(model, torch.cat(crops), need_keys=False)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(features).split([len(c) for c in crops])
    keeps, image = [], 0
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[mask.bool()]
        text = ids[(ids != image_id) & (ids != pad_id)]
        with torch.no_grad():
            instruction = model.get_input_embeddings()(text)
        starts = int(((ids == image_id) & (torch.roll(ids, 1) != image_id)).sum())
        for _ in range(starts):
            keeps.append(cdpruner_selection(projected[image], projected[image], instruction, num_tokens))
            image += 1
    assert image == len(crops)
    return keeps


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "options",
    [{}, {"num_beams": 2, "num_return_sequences": 2}, {"use_cache": False}, {"cache_implementation": "static"}],
)
def test_each_image_is_chosen_by_its_rows_instruction(family, options):
    model, inputs = model_and_inputs(family)
    vispruner.apply(model, NUM_TOKENS, method="cdpruner")
    model.generate(**inputs, max_new_tokens=2, do_sample=False, **options)
    selections = [selection.keep for selection in vispruner.last_selection(model)]
    expected = expected_keeps(model, inputs, NUM_TOKENS)
    if len(selections) == 2 * len(expected):  # beams: the model encodes each row's images once per copy
        rows = [1, 2]  # images per row of TEXTS
        copies, start = [], 0
        for count in rows:
            copies += expected[start : start + count] * 2
            start += count
        expected = copies
    assert len(selections) == len(expected)
    for keep, reference in zip(selections, expected):
        assert torch.equal(keep, reference)


def test_the_instruction_changes_the_selection_and_forward_matches_generate():
    model, inputs = model_and_inputs("llava", texts=["w1 <image> w2 w3"])
    vispruner.apply(model, NUM_TOKENS, method="cdpruner")
    with torch.no_grad():
        model(**inputs)
    by_forward = vispruner.last_selection(model)[0].keep
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert torch.equal(vispruner.last_selection(model)[0].keep, by_forward)
    picks = set()
    for words in ("w1 <image> w2 w3", "w5 w6 <image> w7", "<image> w8"):
        _, other = model_and_inputs("llava", texts=[words])
        with torch.no_grad():
            model(**other)
        picks.add(tuple(vispruner.last_selection(model)[0].keep.flatten().tolist()))
    assert len(picks) > 1


def test_features_alone_have_no_instruction():
    model, inputs = model_and_inputs("llava")
    vispruner.apply(model, NUM_TOKENS, method="cdpruner")
    with pytest.raises(ValueError, match="cdpruner selects by the instruction"):
        model.model.get_image_features(pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_qwen_batch_rows_get_their_own_instruction(family):
    # Each prompt alone and the two in one batch (several images and videos per prompt).
    model = QWEN_BUILDERS[family]()
    prompts = [["w1", ("image", 6, 4), "w2", ("image", 4, 4)], ["w3", "w4", ("image", 6, 4), "w5", "w6", "w7"]]
    vispruner.apply(model, 3, method="cdpruner")
    alone, pixels = [], []
    for prompt in prompts:
        inputs = qwen_inputs(family, [prompt])
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        alone += [selection.keep for selection in vispruner.last_selection(model)]
        pixels.append(inputs["pixel_values"])
    batch = qwen_inputs(family, prompts)
    batch["pixel_values"] = torch.cat(pixels)  # the same images as alone
    model.generate(**batch, max_new_tokens=1, do_sample=False)
    together = [selection.keep for selection in vispruner.last_selection(model)]
    assert len(together) == len(alone) == 3
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
