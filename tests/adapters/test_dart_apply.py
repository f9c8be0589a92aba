"""DART through vispruner.apply against a step-by-step reference: one unpadded row at a time, no
cache, decoder layers called one by one; at layer K the previous layer's output goes through the
model's final norm, layer K-1's keys are recomputed from its input (norm, key projection, rotary
embedding, heads repeated), and every image (or crop) keeps ``num_tokens`` tokens by
:func:`dart_keep`, its text pivots chosen among the prompt's text after it."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vispruner
from vispruner.methods.dart import dart_keep

from .cases import FAMILIES
from .reference_fastv import fastv_greedy, pruned_logits, prompt_rows
from .test_fastv import LAYERS, model_and_inputs, new_tokens

NUM_TOKENS = 6
STEPS = 3


def text_flags(model, embeds: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Text tokens of a reference row: not in a group, and not LLaVA-NeXT's newline embedding."""
    text = groups == -1
    newline = getattr(model.model, "image_newline", None)
    if newline is not None:
        text &= ~(embeds[: len(groups)] == newline).all(dim=-1)
    return text


def dart_logits(model, embeds, groups, layer, num_tokens):
    language_model = model.model.language_model
    prompt = len(groups)
    text = text_flags(model, embeds, groups)

    def choose(before, hidden, positions):
        attention = language_model.layers[layer - 1].self_attn
        width, length = attention.head_dim, before.shape[1]
        keys = attention.k_proj(language_model.layers[layer - 1].input_layernorm(before))
        keys = keys.view(1, length, -1, width).transpose(1, 2)
        cos, sin = language_model.rotary_emb(before, positions[None])
        keys = apply_rotary_pos_emb(keys, keys, cos, sin)[0].repeat_interleave(attention.num_key_value_groups, 1)
        keys = keys[0].transpose(0, 1).reshape(length, -1)[:prompt]
        normed = language_model.norm(hidden)[0, :prompt]
        keep = torch.ones(length, dtype=torch.bool)
        for group in sorted(set(groups.tolist()) - {-1}):
            members = (groups == group).nonzero().flatten()
            after = (text & (torch.arange(prompt) > members[-1])).nonzero().flatten()
            keep[members] = False
            keep[dart_keep(normed, keys, members, after, num_tokens)] = True
        return keep

    return pruned_logits(model, embeds, layer, choose)


def dart_greedy(model, embeds, groups, layer, num_tokens, steps):
    return fastv_greedy(model, embeds, groups, layer, num_tokens, steps, run=dart_logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("attn_implementation", "layer"), [("sdpa", 2), ("sdpa", 1), ("eager", 3)])
def test_greedy_tokens_and_logits_match_reference(family, attn_implementation, layer):
    model, inputs = model_and_inputs(family, attn_implementation)
    rows = prompt_rows(model, inputs)
    vispruner.apply(model, NUM_TOKENS, method="dart", layer=layer)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)
    for row, (embeds, groups) in enumerate(rows):
        tokens, expected = dart_greedy(model, embeds, groups, layer, NUM_TOKENS, STEPS)
        assert new_tokens(out.sequences, inputs)[row] == tokens
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-5)
    # Exactly num_tokens per crop (or all of a smaller crop), plus the newlines.
    for selection in vispruner.last_selection(model):
        assert (selection.keep.sum(dim=1) <= NUM_TOKENS).all()


def test_llava_keeps_exactly_num_tokens_per_image_and_the_authors_mapping():
    model, inputs = model_and_inputs("llava")
    for num_tokens in (1, 4, 7, 12, 20):
        vispruner.apply(model, num_tokens, method="dart")
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        assert [int(s.keep.sum()) for s in vispruner.last_selection(model)] == [num_tokens] * 3


def test_layer_count_and_language_model_checks_name_dart():
    model, inputs = model_and_inputs("llava")
    with pytest.raises(ValueError, match=r"layer must be an integer in \[1, 3\]"):
        vispruner.apply(model, NUM_TOKENS, method="dart", layer=LAYERS)
    with pytest.raises(ValueError, match="pivot_text_tokens must be an integer >= 0"):
        vispruner.apply(model, NUM_TOKENS, method="dart", pivot_text_tokens=-1)
    vispruner.apply(model, NUM_TOKENS, method="dart")
    with pytest.raises(NotImplementedError, match="dart needs a dynamic KV cache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_and_sampling_select_as_greedy_does(family):
    model, inputs = model_and_inputs(family)
    vispruner.apply(model, NUM_TOKENS, method="dart")
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    greedy = [selection.keep for selection in vispruner.last_selection(model)]
    for options in ({"num_beams": 3, "num_return_sequences": 2}, {"do_sample": True, "top_k": 5}):
        out = model.generate(**inputs, max_new_tokens=2, **options)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 2
        assert all(torch.equal(s.keep, g) for s, g in zip(vispruner.last_selection(model), greedy, strict=True))
