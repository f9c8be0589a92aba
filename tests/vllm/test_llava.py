"""The plugin on the bundled LLaVA testbed against the library's transformers path: greedy tokens,
log-probs within 1e-4, prompt lengths and kept indices, for every vision-stage method."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

from .engines import Request, assert_same, engine, library_results, load_reference, scene_requests, vllm_kept, vllm_results  # noqa: E402

METHODS = ["vispruner", "fastervlm", "visionzip", "divprune", "random", "pooling"]
#: The testbed's 8 x 8 patches per image; its prompt template's text tokens around them.
PATCHES = 64


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.fixture(scope="module")
def requests():
    # Different questions (prompt lengths) and scenes; the last prompt holds two images.
    single = scene_requests(3)
    pair = scene_requests(2, start=3)
    two = Request(pair[0].prompt.replace("<image>", "<image> <image>"), [pair[0].images[0], pair[1].images[0]])
    return [*single, two]


def test_unpruned_engine_is_vllm_own(reference, requests):
    # Without the override the plugin changes nothing: the full prompt, transformers' tokens.
    want = library_results(*reference, requests, None)
    with engine() as llm:
        got = vllm_results(llm, requests)
        assert llm.apply_model(lambda model: model.vispruner_settings) == [None]
    assert_same(got, want)


#: Each engine start costs 5-15 s: CI runs every method at K=16 and VisPruner at every K; the
#: rest is marked slow (`-m slow` runs it).
CASES = [
    pytest.param(method, k, marks=() if method == "vispruner" or k == 16 else pytest.mark.slow)
    for method in METHODS
    for k in (64, 16, 4)
]


@pytest.mark.parametrize(("method", "num_tokens"), CASES)
def test_method_matches_library(reference, requests, method, num_tokens):
    options = {"method": method, "num_tokens": num_tokens}
    want = library_results(*reference, requests, options)
    with engine(vispruner_options=options) as llm:
        got = vllm_results(llm, requests)
        # The batch's images went through the tower in one call, in request order.
        chosen = vllm_kept(llm)
    assert_same(got, want)
    kept = min(num_tokens, PATCHES)
    for request, result in zip(requests, want):
        unpruned = len(reference[1](images=request.images, text=[request.prompt])["input_ids"][0])
        assert result.prompt_length == unpruned - len(request.images) * (PATCHES - kept)
    assert chosen == [image for r in want for image in r.kept]
    assert all(len(crop) == kept for image in chosen for crop in image)
