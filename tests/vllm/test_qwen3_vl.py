"""The plugin on a tiny random Qwen3-VL against the library's transformers path: greedy tokens,
log-probs within 1e-4 (original 3D positions; deepstack features follow the keep mask), prompt
lengths (text + K per image) and kept indices, for every vision-stage method, images of
different sizes, several per prompt."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from tests.tiny_models import random_images  # noqa: E402

from .engines import (  # noqa: E402
    QWEN3_PATCH,
    Request,
    assert_same,
    engine,
    library_results,
    save_tiny_qwen3_vl,
    scene_requests,
    vllm_kept,
    vllm_results,
)

METHODS = ["vispruner", "fastervlm", "visionzip", "divprune", "random", "pooling"]
MERGED = 2 * QWEN3_PATCH


def tokens_of(image) -> int:
    return (image.height // MERGED) * (image.width // MERGED)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_qwen3_vl(tmp_path_factory.mktemp("tiny_qwen3_vl"))


@pytest.fixture(scope="module")
def reference(tiny):
    import torch

    model = AutoModelForImageTextToText.from_pretrained(tiny, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny, local_files_only=True)


def qwen3_requests() -> list[Request]:
    """Images of 24, 12 + 24, 35 and 16 + 6 + 48 merged tokens; images set apart by a word."""
    scenes = scene_requests(4)
    noise = random_images([(96, 64), (48, 64), (64, 96), (112, 80), (64, 64), (32, 48), (96, 128)], seed=5)
    two = Request(scenes[1].prompt.replace("<image>", "<image> or <image>"), noise[1:3])
    three = Request(scenes[3].prompt.replace("<image>", "<image> or <image> or <image>"), noise[4:])
    return [Request(scenes[0].prompt, [noise[0]]), two, Request(scenes[2].prompt, [noise[3]]), three]


def test_unpruned_engine_is_vllm_own(tiny, reference):
    requests = qwen3_requests()
    want = library_results(*reference, requests, None)
    with engine(tiny, max_model_len=512) as llm:
        got = vllm_results(llm, requests)
        assert llm.apply_model(lambda model: model.vispruner_settings) == [None]
    assert_same(got, want)


#: As for Qwen2.5-VL: VisPruner at every K and the methods with their own signals at K=8 in CI.
CI_CASES = {("vispruner", 16), ("vispruner", 8), ("vispruner", 2), ("visionzip", 8), ("divprune", 8), ("pooling", 8)}
CASES = [
    pytest.param(method, k, marks=() if (method, k) in CI_CASES else pytest.mark.slow)
    for method in METHODS
    for k in (16, 8, 2)
]


@pytest.mark.parametrize(("method", "num_tokens"), CASES)
def test_method_matches_library(tiny, reference, method, num_tokens):
    options = {"method": method, "num_tokens": num_tokens}
    requests = qwen3_requests()
    want = library_results(*reference, requests, options)
    with engine(tiny, vispruner_options=options, max_model_len=512) as llm:
        got = vllm_results(llm, requests)
        chosen = vllm_kept(llm)
    assert_same(got, want)
    assert chosen == [image for r in want for image in r.kept]
    for request, result in zip(requests, want):
        unpruned = len(reference[1](images=request.images, text=[request.prompt])["input_ids"][0])
        removed = sum(tokens_of(image) - min(num_tokens, tokens_of(image)) for image in request.images)
        assert result.prompt_length == unpruned - removed


def test_chunked_prefill_exact(tiny, reference):
    # Chunks of 8 tokens cut the kept tokens (up to 12 per image) of the images across chunks.
    options = {"method": "vispruner", "num_tokens": 12}
    requests = qwen3_requests()
    want = library_results(*reference, requests, options)
    with engine(tiny, vispruner_options=options, max_model_len=512, enable_chunked_prefill=True, max_num_batched_tokens=8) as llm:
        got = vllm_results(llm, requests)
    assert_same(got, want)
