"""Tokenizer, processor and model of the testbed: built offline, saved and loaded unchanged."""

import pytest
import torch

from vispruner.testbed.model import NUM_PATCHES, build_model, build_processor, encode, load_testbed, prompt
from vispruner.testbed.scenes import make_sample, vocabulary


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_tokenizer_round_trips_every_word(processor):
    tokenizer = processor.tokenizer
    words = vocabulary()
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == " ".join(words)
    assert tokenizer("What COLOR is it?", add_special_tokens=False)["input_ids"] == tokenizer(
        "what color is it ?", add_special_tokens=False
    )["input_ids"]


def test_processor_puts_one_placeholder_per_patch_after_the_question(processor):
    sample = make_sample(3)
    batch = encode(processor, [sample.scene.render()], [sample.question.text])
    ids = batch["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_id) == NUM_PATCHES
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    expected = ["<s>", "user", ":", *sample.question.text.split(), *["<image>"] * NUM_PATCHES, "assistant", ":"]
    assert tokens == expected
    assert batch["pixel_values"].shape == (1, 3, 112, 112)
    assert prompt(processor, "how many ?").startswith("USER: how many ?")


def test_batches_are_left_padded(processor):
    images = [make_sample(1).scene.render(), make_sample(2).scene.render()]
    batch = encode(processor, images, ["what shape is the red object ?", "how many ?"])
    mask = batch["attention_mask"]
    assert mask[1, 0] == 0 and mask[:, -1].all()


def test_saved_model_loads_offline_and_computes_the_same(tmp_path, processor, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model(processor, seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded, loaded_processor = load_testbed(tmp_path)
    sample = make_sample(5)
    batch = encode(processor, [sample.scene.render()], [sample.question.text])
    again = encode(loaded_processor, [sample.scene.render()], [sample.question.text])
    assert torch.equal(batch["input_ids"], again["input_ids"])
    assert torch.equal(batch["pixel_values"], again["pixel_values"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**again).logits)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="path must hold a saved testbed"):
        load_testbed(tmp_path)


def test_bundled_model_loads_offline_and_answers_most_held_out_questions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from vispruner.eval.answering import answer
    from vispruner.testbed.scenes import held_out

    model, processor = load_testbed()
    samples = held_out(48, seed=5)
    replies = answer(model, processor, [s.scene.render() for s in samples], [s.question.text for s in samples])
    right = sum(r == s.question.answer for r, s in zip(replies, samples))
    assert right / len(samples) >= 0.7  # measured >= 85% on 1000; 48 questions leave room for chance
