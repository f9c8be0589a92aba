"""Gemma 4 against the step-by-step reference (reference_gemma4.py), on a left-padded batch with
images of different sizes, two images in a prompt, and videos: what the language model receives,
greedy tokens (dynamic, static, no cache, eager), sampling with several sequences, beam scores,
the loss with labels, the per-layer embeddings of the small checkpoints, full budget, the
refusals, remove(), and the lmms-eval plugin's check from the config."""

from __future__ import annotations

import pytest
import torch

import vispruner

from ..tiny_gemma4 import AUDIO_PROMPTS, IMG_ID, PROMPTS, VID_ID, VIDEO_PROMPTS, gemma4_inputs, tiny_gemma4
from .reference_gemma4 import continuation_logits, gemma4_items, gemma4_rows, greedy, lm_logits
from .test_new_families import RUNS, STEPS, generate_seeing_decoder, new_tokens

NUM_TOKENS = 3
BATCHES = {"images": PROMPTS, "videos": VIDEO_PROMPTS}


@pytest.fixture(params=["gemma4"], autouse=True)
def family(request) -> str:
    """Every test's id names the family, which the compatibility table (noxfile.py) files it under."""
    return request.param


def prepared(prompts=PROMPTS, method="vispruner", options=None, budget="per_crop", **build):
    model = tiny_gemma4(**build)
    inputs = gemma4_inputs(prompts)
    items = gemma4_items(model, inputs, method, NUM_TOKENS, budget, **(options or {}))
    rows = gemma4_rows(model, inputs, items)
    vispruner.apply(model, NUM_TOKENS, method=method, budget=budget, **(options or {}))
    return model, inputs, rows


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize(("method", "options"), RUNS)
def test_language_model_receives_text_and_kept_tokens(batch, method, options):
    model, inputs, rows = prepared(BATCHES[batch], method, options)
    out, seen = generate_seeing_decoder(model, inputs)
    # The last query's row of the (B, 1, L', L') causal mask: the row's real tokens (None: no padding).
    masks = seen["mask"]["full_attention"]
    real = torch.ones(seen["embeds"].shape[:2], dtype=torch.bool) if masks is None else masks[:, 0, -1]
    for embeds, mask, (expected, _) in zip(seen["embeds"], real, rows, strict=True):
        torch.testing.assert_close(embeds[mask], expected, rtol=1e-4, atol=1e-5)
    assert new_tokens(out, inputs) == [greedy(model, embeds, ids, STEPS) for embeds, ids in rows]
    selections = vispruner.last_selection(model)
    images = len(inputs["pixel_values"])
    videos = len(inputs.get("num_frames_per_video", []))
    assert [selection.modality for selection in selections] == ["image"] * images + ["video"] * videos
    assert all(row.sum() == NUM_TOKENS for selection in selections for row in selection.keep)  # K per image, frame
    assert all(len(embeds) < int(mask.sum()) for (embeds, _), mask in zip(rows, inputs["attention_mask"]))


@pytest.mark.parametrize(
    ("attn_implementation", "generate_options"),
    [("eager", {}), ("sdpa", {"cache_implementation": "static"}), ("sdpa", {"use_cache": False})],
    ids=["eager", "static-cache", "no-cache"],
)
@pytest.mark.parametrize("batch", BATCHES)
def test_greedy_tokens_match_reference(batch, attn_implementation, generate_options):
    model, inputs, rows = prepared(BATCHES[batch], attn_implementation=attn_implementation)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **generate_options)
    assert new_tokens(out, inputs) == [greedy(model, embeds, ids, STEPS) for embeds, ids in rows]


def test_per_layer_embeddings():
    """The small checkpoints' per-layer embeddings: computed from the compacted ids, or compacted
    when given with inputs_embeds (visual tokens read as padding)."""
    model, inputs, rows = prepared(per_layer=True, in_vocab=True)
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    logits = torch.stack(out.logits, dim=1)
    for index, ((embeds, ids), sequence) in enumerate(zip(rows, new_tokens(out.sequences, inputs))):
        torch.testing.assert_close(logits[index], continuation_logits(model, embeds, ids, sequence), rtol=1e-4, atol=1e-5)
    language = model.model.language_model
    ids = inputs["input_ids"]
    text_ids = ids.masked_fill((ids == IMG_ID) | (ids == VID_ID), model.config.text_config.pad_token_id)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        per_layer = language.get_per_layer_inputs(text_ids, None)
        given = model(
            **{k: v for k, v in inputs.items() if k != "input_ids"}, inputs_embeds=embeds, per_layer_inputs=per_layer,
        ).logits[:, -1]
    expected = torch.stack([continuation_logits(model, embeds, ids, [0])[0] for embeds, ids in rows])
    torch.testing.assert_close(given, expected, rtol=1e-4, atol=1e-5)


def test_sampling_with_several_sequences():
    model, inputs, rows = prepared(VIDEO_PROMPTS)
    torch.manual_seed(0)
    out = model.generate(
        **inputs, max_new_tokens=STEPS, do_sample=True, num_return_sequences=2,
        return_dict_in_generate=True, output_logits=True,
    )
    logits = torch.stack(out.logits, dim=1)
    for index, sequence in enumerate(new_tokens(out.sequences, inputs)):
        embeds, ids = rows[index // 2]
        torch.testing.assert_close(logits[index], continuation_logits(model, embeds, ids, sequence), rtol=1e-4, atol=1e-5)


def test_beam_search_scores():
    model, inputs, rows = prepared()
    out = model.generate(
        **inputs, max_new_tokens=STEPS, num_beams=3, num_return_sequences=2, length_penalty=0.0,
        do_sample=False, return_dict_in_generate=True, output_scores=True,
    )
    for index, sequence in enumerate(new_tokens(out.sequences, inputs)):
        embeds, ids = rows[index // 2]
        log_probs = continuation_logits(model, embeds, ids, sequence).log_softmax(dim=-1)
        expected = log_probs[torch.arange(len(sequence)), sequence].sum()
        torch.testing.assert_close(out.sequences_scores[index], expected, rtol=1e-4, atol=1e-4)


def test_forward_with_labels():
    model, inputs, rows = prepared(VIDEO_PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    visual = (ids == IMG_ID) | (ids == VID_ID)
    first = mask.cumsum(dim=1) == 1
    labels = ids.masked_fill(visual | (mask == 0) | first, -100)
    total, count = 0.0, 0
    for (embeds, sources), row_labels, row_text in zip(rows, labels, mask.bool() & ~visual):
        text = iter(row_labels[row_text].tolist())
        targets = torch.tensor([next(text) if source >= 0 else -100 for source in sources.tolist()])[1:]
        logits = lm_logits(model, embeds, sources)[:-1]
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)


def test_per_image_budget_spends_a_video_budget_over_its_frames():
    model, inputs, rows = prepared(VIDEO_PROMPTS, budget="per_image")
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert new_tokens(out, inputs) == [greedy(model, embeds, ids, STEPS) for embeds, ids in rows]
    videos = [selection for selection in vispruner.last_selection(model) if selection.modality == "video"]
    assert [int(selection.keep.sum()) for selection in videos] == [NUM_TOKENS, NUM_TOKENS]


@pytest.mark.parametrize("batch", BATCHES)
def test_full_budget_is_stock_and_remove_restores(batch):
    model, inputs = tiny_gemma4(), gemma4_inputs(BATCHES[batch])
    options = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    stock = model.generate(**inputs, **options)
    vispruner.apply(model, 10**6)
    everything = model.generate(**inputs, **options)
    assert torch.equal(everything.sequences, stock.sequences)
    for mine, theirs in zip(everything.logits, stock.logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    vispruner.apply(model, NUM_TOKENS)
    assert not torch.equal(model.generate(**inputs, **options).sequences, stock.sequences)
    vispruner.remove(model)
    again = model.generate(**inputs, **options)
    assert torch.equal(again.sequences, stock.sequences)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(again.logits, stock.logits))


def test_fastv_is_refused():
    with pytest.raises(TypeError, match="fastv does not support Gemma 4: .*sliding-window"):
        vispruner.apply(tiny_gemma4(text_layers=4), NUM_TOKENS, method="fastv")


def test_lmms_plugin_reads_the_family_from_the_config(tmp_path):
    from vispruner.lmms.arguments import parse_model_args
    from vispruner.lmms.loading import check_checkpoint

    tiny_gemma4().config.save_pretrained(tmp_path)  # config only: nothing to load
    assert check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8})) == "gemma4"
    with pytest.raises(ValueError, match="model_args fastv does not support Gemma 4"):
        check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8, "method": "fastv"}))


def test_audio_passes_through():
    """E2B / E4B take audio: its tokens stay (the stock audio tower's), and so do its features;
    at full budget the stock model's, bit for bit."""
    model, inputs = tiny_gemma4(audio=True), gemma4_inputs(AUDIO_PROMPTS)
    options = dict(max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    stock = model.generate(**inputs, **options)
    vispruner.apply(model, 10**6)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(model.generate(**inputs, **options).logits, stock.logits))
    rows = gemma4_rows(model, inputs, gemma4_items(model, inputs, "vispruner", NUM_TOKENS))
    assert sorted(int((ids == -3).sum()) for _, ids in rows) == [6, 10]
    vispruner.apply(model, NUM_TOKENS)
    out = model.generate(**inputs, **options)
    logits = torch.stack(out.logits, dim=1)
    for index, ((embeds, ids), sequence) in enumerate(zip(rows, new_tokens(out.sequences, inputs))):
        torch.testing.assert_close(logits[index], continuation_logits(model, embeds, ids, sequence), rtol=1e-4, atol=1e-5)
