"""``positions="original"`` against the step-by-step reference (see reference.py).

The reference computes each kept token's position in the unpruned, unpadded prompt, feeds one
row of kept embeddings at a time with those positions (and a mask, so that gaps are not read as
packed sequences), and numbers generated tokens from the unpruned prompt's length on. The model
runs the usual left-padded batch with prompts of different lengths and two images in one prompt.
"""

from __future__ import annotations

import pytest
import torch

import vispruner

from .cases import FAMILIES, NUM_TOKENS, TEXTS, model_and_inputs, prepared
from .reference import continuation_logits, greedy, reference_positions

STEPS = 4


def original_positions_case(family, texts=TEXTS):
    """The model patched with ``positions="original"``, its inputs, and per row the reference's
    embeddings, the kept tokens' unpruned positions and the position decoding continues from."""
    model, inputs, images, rows = prepared(family, texts=texts, positions="original")
    positions = reference_positions(model, inputs["input_ids"], inputs["attention_mask"], images)
    return model, inputs, [(embeds, kept, after) for (embeds, _), (kept, after) in zip(rows, positions)]


def generated(out, inputs) -> torch.Tensor:
    return out.sequences[:, inputs["input_ids"].shape[1] :]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "generate_options",
    [{}, {"cache_implementation": "static"}, {"use_cache": False}],
    ids=["dynamic-cache", "static-cache", "no-cache"],
)
def test_generate_logits_match_reference_with_original_positions(family, generate_options):
    model, inputs, references = original_positions_case(family)
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["attention_mask"], kwargs["position_ids"]))

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model.generate(
            **inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True,
            **generate_options,
        )
    finally:
        handle.remove()
    logits = torch.stack(out.logits, dim=1)
    mask, positions = seen[0]
    for row, (embeds, kept, after) in enumerate(references):
        assert positions[row][mask[row].bool()].tolist() == kept.tolist()
        tokens = generated(out, inputs)[row].tolist()
        assert tokens == greedy(model, embeds, STEPS, kept, after)
        expected = continuation_logits(model, embeds, tokens, kept, after)
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-5)
        # The comparison can tell the two numberings apart.
        compacted = continuation_logits(model, embeds, tokens)
        assert not torch.allclose(logits[row], compacted, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_scores_match_reference(family):
    model, inputs, references = original_positions_case(family)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, length_penalty=0.0,
        do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    for index, sequence in enumerate(generated(out, inputs)):
        embeds, kept, after = references[index // 2]
        log_probs = continuation_logits(model, embeds, sequence.tolist(), kept, after).log_softmax(dim=-1)
        expected = log_probs[torch.arange(len(sequence)), sequence].sum()
        torch.testing.assert_close(out.sequences_scores[index], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_positions", [False, True], ids=["no-position-ids", "position-ids"])
def test_hand_written_decode_loop(family, with_positions):
    model, inputs, references = original_positions_case(family)
    mask = inputs["attention_mask"]
    # The caller numbers the full-length sequence, as for an unpruned model (or lets it count).
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0) if with_positions else None
    out = model(**inputs, position_ids=positions, use_cache=True)
    next_tokens = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)
    step_positions = positions[:, -1:] + 1 if with_positions else None
    step = model(input_ids=next_tokens, attention_mask=mask, position_ids=step_positions, past_key_values=out.past_key_values)
    pads = (inputs["attention_mask"] == 0).sum(dim=1)
    for row, (embeds, kept, after) in enumerate(references):
        if not with_positions:
            # Without position ids the model counts the padding too, here as in the unpruned model.
            kept, after = kept + pads[row], after + int(pads[row])
        reference = continuation_logits(model, embeds, [int(next_tokens[row]), 0], kept, after)
        torch.testing.assert_close(out.logits[row, -1], reference[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step.logits[row, -1], reference[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_unpadded_prompt_gets_a_mask_for_its_gaps(family):
    # generate drops the all-ones mask; gapped positions without one would read as packed sequences.
    model, inputs, ((embeds, kept, after),) = original_positions_case(family, texts=["w3 <image> w4 w5"])
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    tokens = generated(out, inputs)[0].tolist()
    assert tokens == greedy(model, embeds, STEPS, kept, after)
    torch.testing.assert_close(
        torch.stack(out.logits, dim=1)[0], continuation_logits(model, embeds, tokens, kept, after), rtol=1e-4, atol=1e-5
    )


def test_apply_checks_positions():
    model, _ = model_and_inputs("llava")
    with pytest.raises(ValueError, match="positions must be one of 'compacted', 'original'; got 'kept'"):
        vispruner.apply(model, NUM_TOKENS, positions="kept")
    with pytest.raises(ValueError, match="positions='compacted' is not supported by fastv"):
        vispruner.apply(model, NUM_TOKENS, method="fastv", layer=1, positions="compacted")
    assert not hasattr(model, "_vispruner")
    vispruner.apply(model, NUM_TOKENS, method="fastv", layer=1, positions="original")
