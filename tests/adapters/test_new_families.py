"""The families added with issue 23 (tile_cases.py) against the step-by-step reference
(reference_tiles.py), on a left-padded batch with images of different sizes, several images and
a video in one prompt: what the language model receives, greedy tokens (dynamic, static, no
cache, eager), sampling with several sequences, beam scores, the loss with labels, FastV, the
refusals, remove(), and the lmms-eval plugin's check from the config."""

from __future__ import annotations

import pytest
import torch

import vispruner
from vispruner.methods import available_methods, get_method

from .reference import continuation_logits, greedy, lm_logits
from .reference_fastv import fastv_greedy
from .reference_tiles import placeholder_rows
from .tile_cases import CASES

NUM_TOKENS = 5
STEPS = 4
#: The reference carries no instruction: cdpruner is checked against its own reference in
#: test_cdpruner_apply.py, and on these families by the contract test.
VISION_METHODS = [
    name for name in available_methods() if get_method(name).stage == "vision" and "text" not in get_method(name).needs
]
#: Every vision method, and VisionZip with contextual tokens (merged by keys; 5 * 10/64 rounds to none).
RUNS = [(name, None) for name in VISION_METHODS] + [("visionzip", {"contextual_ratio": 0.5})]


def prepared(family, method="vispruner", options=None, **build):
    case = CASES[family]
    model = case.build(**build)
    inputs = case.inputs()
    rows = case.rows(model, inputs, method, NUM_TOKENS, **(options or {}))
    vispruner.apply(model, NUM_TOKENS, method=method, **(options or {}))
    return model, inputs, rows


def new_tokens(out, inputs) -> list[list[int]]:
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def generate_seeing_decoder(model, inputs) -> tuple[torch.Tensor, dict]:
    """Greedy ``generate`` of STEPS tokens, and the decoder's first ``inputs_embeds`` and
    ``attention_mask`` (the prefill's: what the language model was given)."""
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])
        seen.setdefault("mask", kwargs["attention_mask"])

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    finally:
        handle.remove()
    return out, seen


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize(("method", "options"), RUNS)
def test_language_model_receives_text_and_kept_tokens(family, method, options):
    model, inputs, rows = prepared(family, method, options)
    out, seen = generate_seeing_decoder(model, inputs)
    for embeds, mask, (expected, _) in zip(seen["embeds"], seen["mask"], rows, strict=True):
        # Pooling averages in another order than the reference with 2 threads: 1.1e-6 seen.
        torch.testing.assert_close(embeds[mask.bool()], expected, rtol=1e-4, atol=1e-5)
    assert new_tokens(out, inputs) == [greedy(model, embeds, STEPS) for embeds, _ in rows]
    selections = vispruner.last_selection(model)
    assert len(selections) == CASES[family].units(inputs)
    assert all(selection.keep.sum(dim=1).tolist() == [NUM_TOKENS] for selection in selections)


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize(
    ("attn_implementation", "generate_options"),
    [("eager", {}), ("sdpa", {"cache_implementation": "static"}), ("sdpa", {"use_cache": False})],
    ids=["eager", "static-cache", "no-cache"],
)
def test_greedy_tokens_match_reference(family, attn_implementation, generate_options):
    model, inputs, rows = prepared(family, attn_implementation=attn_implementation)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **generate_options)
    assert new_tokens(out, inputs) == [greedy(model, embeds, STEPS) for embeds, _ in rows]


def test_internvl_without_qk_norm():
    """InternViT-300M has no q/k norms (identities): the same hooks read the plain projections."""
    model, inputs, rows = prepared("internvl", qk_norm=False)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert new_tokens(out, inputs) == [greedy(model, embeds, STEPS) for embeds, _ in rows]


@pytest.mark.parametrize("family", CASES)
def test_sampling_with_several_sequences(family):
    model, inputs, rows = prepared(family)
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=True, num_return_sequences=2,
        return_dict_in_generate=True, output_logits=True,
    )
    logits = torch.stack(out.logits, dim=1)
    for index, sequence in enumerate(out.sequences[:, inputs["input_ids"].shape[1] :]):
        expected = continuation_logits(model, rows[index // 2][0], sequence.tolist())
        torch.testing.assert_close(logits[index], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", CASES)
def test_beam_search_scores(family):
    model, inputs, rows = prepared(family)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, length_penalty=0.0,
        do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    for index, sequence in enumerate(out.sequences[:, inputs["input_ids"].shape[1] :]):
        tokens = sequence.tolist()
        log_probs = continuation_logits(model, rows[index // 2][0], tokens).log_softmax(dim=-1)
        torch.testing.assert_close(out.sequences_scores[index], log_probs[torch.arange(len(tokens)), sequence].sum(),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", CASES)
def test_forward_with_labels(family):
    model, inputs, rows = prepared(family)
    image_id = model.config.image_token_id
    first = inputs["attention_mask"].cumsum(dim=1) == 1
    labels = inputs["input_ids"].masked_fill((inputs["input_ids"] == image_id) | (inputs["attention_mask"] == 0) | first, -100)
    total, count = 0.0, 0
    for (embeds, sources), ids, row_labels, mask in zip(rows, inputs["input_ids"], labels, inputs["attention_mask"]):
        text = iter(row_labels[mask.bool() & (ids != image_id)].tolist())
        targets = torch.tensor([next(text) if source >= 0 else -100 for source in sources.tolist()])[1:]
        logits = lm_logits(model, embeds)[:-1]
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", CASES)
def test_fastv_matches_reference(family):
    """FastV with one group per budget unit, chosen by layer 1's last-token attention row."""
    layer, case = 2, CASES[family]
    model, inputs = case.build(text_layers=4), case.inputs()
    items = case.items(model, inputs, "random", 10**6)  # every token
    rows = placeholder_rows(model, inputs["input_ids"], inputs["attention_mask"], items)
    vispruner.apply(model, NUM_TOKENS, method="fastv", layer=layer)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)
    owners = iter([unit for unit, (tokens, _) in enumerate(items) for _ in range(len(tokens))])
    for row, (embeds, sources) in enumerate(rows):
        groups = torch.tensor([next(owners) if source < 0 else -1 for source in sources.tolist()])
        tokens, expected = fastv_greedy(model, embeds, groups, layer, NUM_TOKENS, STEPS)
        assert new_tokens(out.sequences, inputs)[row] == tokens
        torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", CASES)
def test_per_image_budget_and_remove(family):
    case = CASES[family]
    model, inputs = case.build(), case.inputs()
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    if not case.per_image:
        with pytest.raises(ValueError, match=f"per_image.*{case.name}.*which image each"):
            vispruner.apply(model, NUM_TOKENS, budget="per_image")
    vispruner.apply(model, NUM_TOKENS)
    assert not torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)
    vispruner.remove(model)
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)


def test_internvl_refuses_a_feature_strategy_with_cls():
    model, inputs = CASES["internvl"].build(), CASES["internvl"].inputs()
    vispruner.apply(model, NUM_TOKENS)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        model(**inputs, vision_feature_select_strategy="full")


@pytest.mark.parametrize("family", CASES)
def test_lmms_plugin_reads_the_family_from_the_config(family, tmp_path):
    from vispruner.lmms.arguments import parse_model_args
    from vispruner.lmms.loading import check_checkpoint

    case = CASES[family]
    case.build().config.save_pretrained(tmp_path)  # config only: nothing to load
    assert check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8})) == family
    if not case.per_image:
        with pytest.raises(ValueError, match=f"per_image.*not supported on {case.name}"):
            check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8, "budget": "per_image"}))


def test_smolvlm_refuses_tiles_padded_inside():
    """The processor makes whole tiles; a tile padded inside (pixel_attention_mask with zeros) would
    need the received attention masked as SigLIP masks it, which is not implemented."""
    model, inputs = CASES["smolvlm"].build(), CASES["smolvlm"].inputs()
    inputs["pixel_attention_mask"][0, 0, :, -4:] = 0
    vispruner.apply(model, NUM_TOKENS)
    with pytest.raises(NotImplementedError, match="pixel_attention_mask all ones"):
        model.generate(**inputs, max_new_tokens=1)


def test_mistral3_refuses_several_feature_layers():
    model, inputs = CASES["mistral3"].build(), CASES["mistral3"].inputs()
    vispruner.apply(model, NUM_TOKENS)
    with pytest.raises(ValueError, match=r"one vision_feature_layer \(an int\); got \[-1, -2\]"):
        model(**inputs, vision_feature_layer=[-1, -2])
