"""The Qwen testbed: stock processor and model built offline, saved and loaded unchanged; the
training path computes what the stock forward does; pruned generation runs."""

import json
import math

import pytest
import torch

import vispruner
from vispruner.eval.answering import answer
from vispruner.testbed import qwen
from vispruner.testbed.architectures import ARCHITECTURES
from vispruner.testbed.model import encode, load_testbed
from vispruner.testbed.scenes import held_out, make_sample
from vispruner.testbed.train import QuestionBatcher, language_forward

GRID = math.isqrt(qwen.NUM_TOKENS)


@pytest.fixture(scope="module")
def processor():
    return qwen.build_processor()


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    model = qwen.build_model(processor, seed=1)
    # Peaked weights, so that a wrong token order or position changes the logits visibly.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    return model


def test_processor_puts_one_placeholder_per_merged_token(processor):
    sample = make_sample(3)
    batch = encode(processor, [sample.scene.render()], [sample.question.text + " zebra"])
    ids = batch["input_ids"][0].tolist()
    assert ids.count(processor.image_token_id) == qwen.NUM_TOKENS == 64
    # Only the placeholders are image tokens; an unknown word is <unk>, never a video token.
    assert batch["mm_token_type_ids"][0].tolist() == [int(i == processor.image_token_id) for i in ids]
    assert processor.tokenizer.unk_token_id in ids and processor.video_token_id not in ids
    assert batch["image_grid_thw"].tolist() == [[1, 2 * GRID, 2 * GRID]]
    assert batch["pixel_values"].shape == (4 * qwen.NUM_TOKENS, 3 * 2 * qwen.PATCH_SIZE**2)


def test_model_is_a_windowed_tower_with_a_full_attention_block(model):
    vision = model.config.vision_config
    assert model.config.model_type == "qwen2_5_vl" and vision.spatial_merge_size == 2
    assert 0 < len(vision.fullatt_block_indexes) < vision.depth
    windows = vision.window_size // (vision.patch_size * vision.spatial_merge_size)
    assert GRID % windows == 0 and windows < GRID  # more than one window per image


def test_saved_testbed_loads_offline_and_computes_the_same(tmp_path, processor, model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ARCHITECTURES["qwen"].save(model, processor, tmp_path)
    loaded, loaded_processor = load_testbed(tmp_path)
    sample = make_sample(5)
    batch = encode(processor, [sample.scene.render()], [sample.question.text])
    again = encode(loaded_processor, [sample.scene.render()], [sample.question.text])
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)


def test_training_path_computes_the_stock_forward(processor, model):
    """Cached cells, the merger on them and gathered M-RoPE positions give the logits that
    the stock forward gives from pixels (one prompt at a time, so that padding plays no part)."""
    arch = ARCHITECTURES["qwen"]
    samples = held_out(3, seed=2)
    scenes, questions = [s.scene for s in samples], [s.question for s in samples]
    batch = QuestionBatcher(processor).build([q.text for q in questions], [q.answer for q in questions])
    with torch.no_grad():
        features = arch.image_features(model, arch.pixels(processor, scenes))
        logits, _ = language_forward(model, arch, batch, features)
        for b, (scene, question) in enumerate(zip(scenes, questions)):
            stock = model(**encode(processor, [scene.render()], [question.text])).logits[0]
            torch.testing.assert_close(logits[b, : len(stock)], stock, rtol=1e-4, atol=1e-4)


def test_kept_image_tokens_keep_their_row_and_column(processor, model):
    arch = ARCHITECTURES["qwen"]
    sample = make_sample(7)
    keep = torch.zeros(1, qwen.NUM_TOKENS, dtype=torch.bool)
    cells = [0, 9, 30, 63]
    keep[0, cells] = True
    batch = QuestionBatcher(processor).build([sample.question.text], [sample.question.answer], keep)
    positions = arch.positions(model, batch.full_ids, batch.full_mask, batch.columns)[:, 0]
    ids = batch.ids[0].tolist()
    start = ids.index(processor.image_token_id)  # text before the image counts 0 .. start - 1
    image = [i for i, token in enumerate(ids) if token == processor.image_token_id]
    expected = [[start, start + cell // GRID, start + cell % GRID] for cell in cells]
    assert positions[:, image].T.tolist() == expected
    # Text after the image continues after the image's 8 x 8 extent, as if nothing were dropped.
    after = image[-1] + 1
    assert positions[:, after].tolist() == [start + GRID] * 3


def test_a_few_steps_of_every_stage_train_and_save_a_loadable_qwen(tmp_path, capsys):
    from vispruner.testbed.train import main

    torch.manual_seed(0)
    main(
        [
            "--arch", "qwen", "--out", str(tmp_path), "--tower-steps", "2", "--language-steps", "2",
            "--batch", "2", "--language-batch", "4", "--train-scenes", "8", "--val-size", "8",
        ]
    )
    assert "qwen: parameters" in capsys.readouterr().out
    model, processor = load_testbed(tmp_path)
    assert model.config.model_type == "qwen2_5_vl"
    assert processor.image_token_id == model.config.image_token_id


def test_pruned_generation_keeps_the_budget_and_remove_restores(processor, model):
    samples = held_out(4, seed=3)
    images, questions = [s.scene.render() for s in samples], [s.question.text for s in samples]
    full = answer(model, processor, images, questions)
    for method in ("vispruner", "random"):
        with vispruner.pruned(model, num_tokens=7, method=method):
            assert len(answer(model, processor, images, questions)) == 4
            keep = vispruner.last_selection(model)[0].keep
            assert keep.shape[-1] == qwen.NUM_TOKENS and (keep.sum(-1) == 7).all()
    assert answer(model, processor, images, questions) == full


@pytest.fixture
def installed(tmp_path, processor, model, monkeypatch):
    """``testbed-qwen`` served from a saved copy of the random model, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tmp_path / "weights_qwen"
    ARCHITECTURES["qwen"].save(model, processor, weights)
    monkeypatch.setattr(qwen, "WEIGHTS", weights)
    return weights


def test_demo_and_eval_run_on_testbed_qwen(installed, tmp_path, capsys):
    from vispruner.cli import main

    picture = tmp_path / "demo.png"
    assert main(["demo", "--model", "testbed-qwen", "--tokens", "11%", "--out", str(picture)]) == 0
    text = capsys.readouterr().out
    assert "  64 visual tokens" in text and "   7 visual tokens" in text
    assert picture.stat().st_size > 0
    report = tmp_path / "eval.json"
    argv = ["eval", "--model", "testbed-qwen", "--methods", "vispruner,random", "--tokens", "100%,11%"]
    assert main([*argv, "--n", "4", "--batch-size", "4", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["visual_tokens"] == 64
    assert [(r["method"], r["num_tokens"]) for r in data["rows"]] == [
        ("vispruner", 64), ("vispruner", 7), ("random", 64), ("random", 7)
    ]


def test_testbed_qwen_without_weights_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from vispruner.cli import main

    monkeypatch.setattr(qwen, "WEIGHTS", tmp_path / "missing")
    assert main(["eval", "--model", "testbed-qwen", "--n", "1"]) == 2
    assert "--model 'testbed-qwen': its weights are not installed" in capsys.readouterr().err


def test_decoder_started_from_the_llava_testbed_reads_text_as_it_does(processor):
    """On a text-only prompt (where M-RoPE is plain RoPE), the copied decoder computes the LLaVA
    testbed's logits word for word: a wrong row mapping or a missed layer would not."""
    from vispruner.testbed.train import start_from_testbed_decoder

    donor, donor_processor = load_testbed()
    model = qwen.build_model(processor, seed=3)
    start_from_testbed_decoder(model, processor, log=lambda line: None)
    words = "user : what color is the circle ? assistant :".split()
    ids = torch.tensor([processor.tokenizer.convert_tokens_to_ids(words)])
    donor_ids = torch.tensor([donor_processor.tokenizer.convert_tokens_to_ids(words)])
    assert not torch.equal(ids, donor_ids)  # the numbering differs: the mapping is exercised
    with torch.no_grad():
        ours = model.lm_head(model.model.language_model(input_ids=ids).last_hidden_state)
        theirs = donor.lm_head(donor.model.language_model(input_ids=donor_ids).last_hidden_state)
    shared = [w for w in donor_processor.tokenizer.get_vocab() if w in processor.tokenizer.get_vocab()]
    columns = torch.tensor(processor.tokenizer.convert_tokens_to_ids(shared))
    donor_columns = torch.tensor(donor_processor.tokenizer.convert_tokens_to_ids(shared))
    torch.testing.assert_close(ours[..., columns], theirs[..., donor_columns], atol=1e-5, rtol=1e-5)


def test_an_unknown_decoder_start_is_refused():
    from vispruner.testbed.train import train

    with pytest.raises(ValueError, match="language_init must be None or 'testbed'"):
        train(arch="qwen", language_init="llama")


def test_bundled_qwen_testbed_loads_offline_and_answers_most_held_out_questions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vispruner.testbed.model import load_model

    model, processor = load_model("testbed-qwen")
    assert model.config.model_type == "qwen2_5_vl"
    samples = held_out(48, seed=5)
    replies = answer(model, processor, [s.scene.render() for s in samples], [s.question.text for s in samples])
    right = sum(r == s.question.answer for r, s in zip(replies, samples))
    assert right / len(samples) >= 0.7  # measured >= 85% on 1000; 48 questions leave room for chance
