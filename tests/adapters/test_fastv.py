"""FastV through vispruner.apply against the step-by-step reference (reference_fastv.py).

Tiny models with four decoder layers, so that layers 0-1 run on the whole prompt and layers
2-3 on the pruned one (the paper's K = 2); batches are left padded, with prompts of different
lengths and two images in one prompt.
"""

from __future__ import annotations

import functools

import pytest
import torch

import vispruner

from . import cases
from .cases import FAMILIES, equal_length_texts, inputs_for, right_padded
from .reference_fastv import fastv_greedy, fastv_logits, prompt_rows

NUM_TOKENS = 6
STEPS = 4
LAYERS = 4
model_and_inputs = functools.partial(cases.model_and_inputs, text_layers=LAYERS)


def new_tokens(output, inputs) -> list[list[int]]:
    return output[:, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("attn_implementation", "layer"), [("sdpa", 1), ("sdpa", 2), ("sdpa", 3), ("eager", 2)])
def test_greedy_tokens_and_logits_match_reference(family, attn_implementation, layer):
    model, inputs = model_and_inputs(family, attn_implementation)
    rows = prompt_rows(model, inputs)
    vispruner.apply(model, NUM_TOKENS, method="fastv", layer=layer)
    widths = []
    norm = model.model.language_model.norm
    handle = norm.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    try:
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
    finally:
        handle.remove()
    logits = torch.stack(out.logits, dim=1)
    for row, (embeds, groups) in enumerate(rows):
        tokens, expected = fastv_greedy(model, embeds, groups, layer, NUM_TOKENS, STEPS)
        assert new_tokens(out.sequences, inputs)[row] == tokens
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-5)
    # After the cut the prefill is exactly as wide as its longest kept row: no padding survives.
    kept = [int(fastv_logits(model, embeds, groups, layer, NUM_TOKENS)[1].sum()) for embeds, groups in rows]
    assert widths[0] == max(kept) < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_single_unpadded_prompt_matches_reference(family):
    # generate drops the all-ones mask: the layers after the cut get no mask and gapped positions.
    model, inputs = model_and_inputs(family, texts=["w3 <image> w4 w5"])
    ((embeds, groups),) = prompt_rows(model, inputs)
    vispruner.apply(model, NUM_TOKENS, method="fastv")
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert new_tokens(out, inputs) == [fastv_greedy(model, embeds, groups, 2, NUM_TOKENS, STEPS)[0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_batch_that_pruning_leaves_uneven(family):
    # generate() drops the all-ones mask: the layers after the cut rebuild it from the compacted
    # prefill's, over their own (shorter) cache.
    model, _ = model_and_inputs(family)
    inputs = inputs_for(model, family, equal_length_texts(model, family))
    rows = prompt_rows(model, inputs)
    vispruner.apply(model, NUM_TOKENS, method="fastv")
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)
    for row, (embeds, groups) in enumerate(rows):
        tokens, expected = fastv_greedy(model, embeds, groups, 2, NUM_TOKENS, STEPS)
        assert new_tokens(out.sequences, inputs)[row] == tokens
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("budget", ["per_crop", "per_image"])
def test_llava_next_budgets_match_reference(budget):
    model, inputs = model_and_inputs("llava_next")
    rows = prompt_rows(model, inputs, budget)
    vispruner.apply(model, NUM_TOKENS, method="fastv", budget=budget)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert new_tokens(out, inputs) == [fastv_greedy(model, e, g, 2, NUM_TOKENS, STEPS)[0] for e, g in rows]
    for selection in vispruner.last_selection(model):
        counts = selection.keep.sum(dim=1)
        if budget == "per_crop":
            assert (counts <= NUM_TOKENS).all() and int(counts.sum()) > 0
        else:
            assert int(counts.sum()) == NUM_TOKENS


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_forward_with_labels_matches_reference_loss(family, padding):
    # With right padding (training batches), each row's last real token is not the last column.
    model, inputs = model_and_inputs(family)
    if padding == "right":
        inputs = right_padded(inputs)
    rows = prompt_rows(model, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # Image tokens, padding, and each row's first token, which nothing before it in the row predicts.
    first = mask.cumsum(dim=1) == 1
    labels = ids.masked_fill((ids == model.config.image_token_id) | (mask == 0) | first, -100)
    vispruner.apply(model, NUM_TOKENS, method="fastv")
    out = model(**inputs, labels=labels)
    total, count = 0.0, 0
    for (embeds, groups), row_labels, row_mask in zip(rows, labels, mask):
        logits, keep = fastv_logits(model, embeds, groups, 2, NUM_TOKENS)
        targets = row_labels[row_mask.bool()][keep][1:]
        total = total + torch.nn.functional.cross_entropy(logits[:-1], targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    torch.testing.assert_close(out.loss, total / count, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_token_or_removing_the_patch_gives_the_stock_model(family):
    model, inputs = model_and_inputs(family)
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    vispruner.apply(model, 10**6, method="fastv")
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)
    vispruner.apply(model, 2, method="fastv")
    assert not torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)
    vispruner.remove(model)
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)
    assert not any(layer._forward_pre_hooks for layer in model.model.language_model.layers)


def test_refusals_name_the_reason():
    model, inputs = model_and_inputs("llava")
    with pytest.raises(ValueError, match=r"layer must be an integer in \[1, 3\]"):
        vispruner.apply(model, NUM_TOKENS, method="fastv", layer=4)
    vispruner.apply(model, NUM_TOKENS, method="fastv")
    with pytest.raises(NotImplementedError, match="static caches are not supported"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    fields = {k: v for k, v in inputs.items() if k != "input_ids"}
    with pytest.raises(NotImplementedError, match=r"finds the image \(and video\) tokens in input_ids"):
        model(inputs_embeds=embeds, **fields)
