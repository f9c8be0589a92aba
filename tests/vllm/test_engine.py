"""Engine-level behaviour: bad overrides stop the engine before it starts (apply's message), an
unserved family with pruning asked is refused, and chunked prefill and prefix caching serve
pruned prompts exactly."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

import vispruner  # noqa: E402

from .engines import Request, assert_same, engine, library_results, load_reference, scene_requests, vllm_results  # noqa: E402


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def test_bad_option_stops_engine_with_apply_message(reference):
    with pytest.raises(ValueError) as from_apply:
        vispruner.apply(reference[0], method="random", num_tokens=8, seed="x")
    with pytest.raises(Exception) as from_engine:
        with engine(vispruner_options={"method": "random", "num_tokens": 8, "seed": "x"}):
            pass
    assert str(from_apply.value) in str(from_engine.value)


def test_fastv_stops_engine():
    with pytest.raises(Exception, match="prunes inside the language model"):
        with engine(vispruner_options={"method": "fastv", "num_tokens": 8}):
            pass


def test_unserved_family_stops_engine(tmp_path):
    # A Mistral 3 checkpoint (its config is all vLLM reads before the check) with pruning asked is
    # refused, naming the served families.
    from transformers import Mistral3Config

    config = Mistral3Config()
    config.architectures = ["Mistral3ForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    with pytest.raises(Exception, match=r"prunes LLaVA-1\.5 .*LLaVA-NeXT .*Qwen2\.5-VL images .*Gemma 3 images .*'mistral3'"):
        with engine(tmp_path, vispruner_options={"num_tokens": 8}):
            pass


def test_chunked_prefill_and_prefix_caching_exact(reference):
    # Chunks of 8 tokens split every pruned prompt (about 44 tokens, two images of 16) inside its
    # images' tokens; the second pass reuses the cached prefix block (32 tokens, the CPU
    # attention's block size), images included.
    options = {"method": "vispruner", "num_tokens": 16}
    requests = [Request(r.prompt.replace("<image>", "<image> <image>"), [r.images[0], o.images[0]])
                for r, o in zip(scene_requests(3), scene_requests(3, start=3))]
    want = library_results(*reference, requests, options)
    with engine(
        vispruner_options=options, enable_chunked_prefill=True, max_num_batched_tokens=8,
        enable_prefix_caching=True, block_size=32,
    ) as llm:
        first = vllm_results(llm, requests)
        second, cached = [], []
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=1)
        for request in requests:  # again, one at a time: whole blocks of the prompt come from the cache
            (output,) = llm.generate({"prompt": request.prompt, "multi_modal_data": {"image": request.images}}, params, use_tqdm=False)
            cached.append(output.num_cached_tokens)
            second.append(output)
    assert_same(first, want)
    assert all(count >= 32 for count in cached), cached
    for output, expected in zip(second, want):
        assert list(output.outputs[0].token_ids) == expected.tokens
