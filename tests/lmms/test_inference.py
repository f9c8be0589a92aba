"""The plugin's generation and log-likelihoods on the bundled testbed, against independent references."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vispruner
from vispruner.eval.answering import answer
from vispruner.lmms.arguments import parse_model_args
from vispruner.lmms.inference import Generation, StopSequences, Visuals, batches, cut, generate, loglikelihoods
from vispruner.lmms.loading import load
from vispruner.testbed.model import encode, load_testbed
from vispruner.testbed.scenes import held_out


@pytest.fixture(scope="module")
def testbed():
    model, processor = load_testbed()
    return model, processor, held_out(12, seed=5)


def requests(samples):
    return [(s.question.text, Visuals(images=[s.scene.render()])) for s in samples]


@pytest.mark.parametrize("method", ["none", "vispruner", "fastv", "cdpruner", "dart"])
def test_batched_generation_matches_the_eval_path_one_question_at_a_time(testbed, method):
    model, processor, samples = testbed
    with vispruner.pruned(model, num_tokens=7, method=method) if method != "none" else torch.no_grad():
        replies = generate(model, processor, requests(samples), Generation(until=("</s>",), max_new_tokens=3))
        # independent reference: vispruner eval's prompt (testbed.model.prompt) and generate, batch of one
        reference = [answer(model, processor, [s.scene.render()], [s.question.text], 3)[0] for s in samples]
    assert [r.split()[0] if r.split() else "" for r in replies] == reference
    assert sum(r.split()[0] == s.question.answer for r, s in zip(replies, samples) if r.split()) >= 6


def test_clip_is_loaded_once_and_each_row_gets_its_question(testbed, testbed_clip):
    from vispruner.adapters.clip_joint import ClipJoint

    _, _, samples = testbed
    args = parse_model_args({"pretrained": "testbed", "method": "cdpruner", "clip": testbed_clip, "num_tokens": 5})
    assert isinstance(args.pruning["clip"], ClipJoint)
    model, processor = load(args, "cpu")
    generate(model, processor, requests(samples[:3]), Generation(until=(), max_new_tokens=1))
    batched = [s.keep for s in vispruner.last_selection(model)]
    alone = []
    for sample in samples[:3]:  # the eval path, one question at a time
        answer(model, processor, [sample.scene.render()], [sample.question.text], 1)
        alone.append(vispruner.last_selection(model)[0].keep)
    assert all(torch.equal(a, b) for a, b in zip(batched, alone)) and len(batched) == 3


def test_loaded_model_is_pruned_as_the_model_args_say(testbed):
    _, _, samples = testbed
    model, processor = load(parse_model_args({"pretrained": "testbed", "num_tokens": 5}), "cpu")
    generate(model, processor, requests(samples[:2]), Generation(until=(), max_new_tokens=1))
    assert all(int(s.keep.sum()) == 5 for s in vispruner.last_selection(model))
    unpruned, _ = load(parse_model_args({"pretrained": "testbed", "method": "none"}), "cpu")
    with pytest.raises(ValueError, match="not patched"):
        vispruner.last_selection(unpruned)


@pytest.mark.parametrize("method", ["none", "vispruner", "fastv", "cdpruner", "dart"])
def test_loglikelihood_is_the_continuation_log_probability_and_greedy_flag(testbed, method):
    model, processor, samples = testbed
    choices = ["red", "two", "yes"]
    items = [(s.question.text, " " + c, Visuals(images=[s.scene.render()])) for s in samples[:4] for c in choices]
    with vispruner.pruned(model, num_tokens=7, method=method) if method != "none" else torch.no_grad():
        batched = loglikelihoods(model, processor, items)
        for (question, continuation, visuals), (score, greedy) in zip(items, batched):
            # reference: the eval path's prompt plus the continuation's token, one row, one forward; the
            # distribution before the last token (FastV selects by the last token of what it is given)
            inputs = encode(processor, visuals.images, [question])
            token = processor.tokenizer.convert_tokens_to_ids(continuation.strip())
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], 1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
            with torch.inference_mode():
                logits = model(**inputs).logits[0, -2].float()
            assert score == pytest.approx(torch.log_softmax(logits, -1)[token].item(), abs=1e-4)
            assert greedy == (int(logits.argmax()) == token)


def test_loglikelihood_of_several_tokens_is_greedy_only_if_every_token_is(testbed):
    """Two-word continuations whose first word is the greedy one and whose second is greedy or
    not: the flag must hold for every token, not for any of them."""
    model, processor, samples = testbed
    tokenizer = processor.tokenizer
    items, expected = [], []
    for sample in samples[:3]:
        visuals = Visuals(images=[sample.scene.render()])
        inputs = encode(processor, visuals.images, [sample.question.text])
        with torch.inference_mode():
            first = int(model(**inputs).logits[0, -1].argmax())
            after_first = torch.cat([inputs["input_ids"], torch.tensor([[first]])], 1)
            mask = torch.ones_like(after_first)
            second = int(model(**{**inputs, "input_ids": after_first, "attention_mask": mask}).logits[0, -1].argmax())
        for other in dict.fromkeys([second, *tokenizer.convert_tokens_to_ids(["red", "two", "yes"])]):
            tokens = [first, other]
            continuation = " " + " ".join(tokenizer.convert_ids_to_tokens(tokens))
            assert tokenizer(continuation, add_special_tokens=False).input_ids == tokens  # really two tokens
            items.append((sample.question.text, continuation, visuals))
            # reference: the eval path's prompt plus both tokens, one row, one forward
            ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], 1)
            with torch.inference_mode():
                logits = model(**{**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}).logits[0, -3:-1]
            scores = torch.log_softmax(logits.float(), -1)
            expected.append((scores[[0, 1], tokens].sum().item(), scores.argmax(-1).tolist() == tokens))
    # The inputs reach the case that tells "every token" from "any token": a greedy first token
    # followed by a token that is not greedy, and also continuations greedy throughout.
    assert any(not greedy for _, greedy in expected) and any(greedy for _, greedy in expected)
    got = loglikelihoods(model, processor, items)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in expected]
    for (score, _), (reference, _) in zip(got, expected):
        assert score == pytest.approx(reference, abs=1e-4)


def test_stop_sequences_cut_the_reply_and_stop_each_row():
    assert cut("red circle . blue", (".", "blue")) == "red circle "
    assert cut("red", ("\n",)) == "red"
    _, processor = load_testbed()
    ids = processor.tokenizer(["red circle", "blue square"], add_special_tokens=False, return_tensors="pt").input_ids
    stop = StopSequences(processor.tokenizer, ("square",), start=0)
    assert stop(ids, None).tolist() == [False, True]


def test_stop_sequences_look_at_the_reply_only():
    # What generate() does: the reply starts after the prompt's columns, and a stop sequence in
    # the prompt does not count.
    _, processor = load_testbed()
    tokenizer = processor.tokenizer
    ids = tokenizer(["red circle blue square", "blue square red circle"], add_special_tokens=False, return_tensors="pt").input_ids
    start = 2
    prompts = tokenizer.batch_decode(ids[:, :start])
    replies = tokenizer.batch_decode(ids[:, start:])
    assert start > 0 and "red" in prompts[0] and "red" not in replies[0] and "red" in replies[1]
    assert StopSequences(tokenizer, ("red",), start=start)(ids, None).tolist() == [False, True]


def test_generation_settings_from_a_task():
    assert Generation.from_task({}, "</s>") == Generation(until=("</s>",))
    settings = Generation.from_task({"until": "\n", "max_new_tokens": 16, "temperature": 0}, "</s>")
    assert settings.until == ("\n",) and settings.generate_kwargs() == {"max_new_tokens": 16, "do_sample": False, "num_beams": 1}
    sampled = Generation.from_task({"temperature": 0.7, "top_p": 0.9}, "</s>").generate_kwargs()
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
    with pytest.raises(ValueError, match="until must be a string or a list of strings"):
        Generation.from_task({"until": [1]}, "</s>")


def test_do_sample_false_is_greedy_whatever_the_temperature():
    task = {"temperature": 0.7, "top_p": 0.9, "do_sample": False}
    assert task["temperature"] > 0 and task["do_sample"] is False  # the task sets both
    greedy = Generation.from_task(task, "</s>").generate_kwargs()
    assert greedy["do_sample"] is False and "temperature" not in greedy and "top_p" not in greedy
    sampled = Generation.from_task({**task, "do_sample": True}, "</s>").generate_kwargs()
    assert sampled["do_sample"] and sampled["temperature"] == 0.7


def test_a_model_without_video_refuses_video(testbed):
    import numpy as np

    model, processor, samples = testbed
    clip = Visuals(videos=[np.zeros((4, 112, 112, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration takes no video"):
        generate(model, processor, [("what color is the circle ?", clip)], Generation(until=()))


def test_video_frames_are_spread_evenly(tmp_path):
    av = pytest.importorskip("av")  # installed with lmms-eval
    import numpy as np

    from vispruner.lmms.inference import video_frames

    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for level in range(10):  # frame i is uniformly grey at 25 * i
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 25 * level, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    frames = video_frames(path, 4)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert np.allclose(frames.reshape(4, -1).mean(1), [0, 75, 150, 225], atol=6)  # frames 0, 3, 6, 9
    assert video_frames(path, 50).shape[0] == 10


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 50)), max_size=40), st.integers(1, 7))
def test_batches_cover_every_request_once_grouped_and_longest_first(rows, size):
    keys, lengths = [k for k, _ in rows], [n for _, n in rows]
    out = batches(keys, lengths, size)
    assert sorted(i for batch in out for i in batch) == list(range(len(rows)))
    for batch in out:
        assert 1 <= len(batch) <= size and len({keys[i] for i in batch}) == 1
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)


def test_testbed_qwen_loads_by_name_and_answers_as_the_eval_path(testbed):
    """The plugin's Qwen path end to end: loaded by name (its processor assembled offline),
    pruned as the model args say, batched generation equal to ``vispruner eval``'s answers."""
    _, _, samples = testbed
    model, processor = load(parse_model_args({"pretrained": "testbed-qwen", "num_tokens": 7}), "cpu")
    assert model.config.model_type == "qwen2_5_vl"
    replies = generate(model, processor, requests(samples), Generation(until=("</s>",), max_new_tokens=3))
    assert all(int(s.keep.sum()) == 7 for s in vispruner.last_selection(model))
    reference = [answer(model, processor, [s.scene.render()], [s.question.text], 3)[0] for s in samples]
    assert [r.split()[0] if r.split() else "" for r in replies] == reference
    assert sum(r.split()[0] == s.question.answer for r, s in zip(replies, samples) if r.split()) >= 6
