"""The plugin on the bundled Qwen2.5-VL testbed against the library's transformers path: greedy
tokens, log-probs within 1e-4 (kept tokens at their original 3D M-RoPE positions: a position error
leaves the tiny model's tokens alone, only log-probs see it), prompt lengths (text + K per image)
and kept indices, for every vision-stage method, images of different sizes, several per prompt."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

from tests.tiny_models import random_images  # noqa: E402

from .engines import (  # noqa: E402
    Request,
    assert_same,
    engine,
    library_results,
    load_qwen_reference,
    save_qwen_testbed,
    scene_requests,
    vllm_kept,
    vllm_results,
)

METHODS = ["vispruner", "fastervlm", "visionzip", "divprune", "random", "pooling"]
#: Merged tokens (14 px) of an image of (height, width) px: the testbed's 7 px patches, 2 x 2 merged.
MERGED = 14


def tokens_of(image) -> int:
    return (image.height // MERGED) * (image.width // MERGED)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    return save_qwen_testbed(tmp_path_factory.mktemp("qwen_testbed"))


@pytest.fixture(scope="module")
def reference(testbed):
    return load_qwen_reference(testbed)


def qwen_requests() -> list[Request]:
    """Prompts of different lengths; images of 64, 60 + 32, 35 and 64 + 30 + 16 merged tokens (grids
    narrower than, wider than and not a multiple of the tower's 4 x 4 windows). Images are set
    apart by a word: the transformers path takes adjacent placeholder runs for one image."""
    scenes = scene_requests(3)
    noise = random_images([(84, 140), (56, 112), (98, 70), (70, 84), (56, 56)], seed=3)
    two = Request(scenes[1].prompt.replace("<image>", "<image> or <image>"), noise[:2])
    three = Request(scenes[2].prompt.replace("<image>", "<image> or <image> or <image>"), [scenes[2].images[0], *noise[3:]])
    return [scenes[0], two, Request(scene_requests(1, start=3)[0].prompt, [noise[2]]), three]


def test_unpruned_engine_is_vllm_own(testbed, reference):
    # Without the override the plugin's subclass is vLLM's Qwen2.5-VL: the full prompt, transformers' tokens.
    requests = qwen_requests()
    want = library_results(*reference, requests, None)
    with engine(testbed) as llm:
        got = vllm_results(llm, requests)
        assert llm.apply_model(lambda model: model.vispruner_settings) == [None]
    assert_same(got, want)


#: Each engine start costs 10-30 s here: CI runs VisPruner at every K and the methods with their
#: own signals (keys and merged features, projected tokens, the grid) at K=16; `-m slow` runs the rest.
CI_CASES = {("vispruner", 40), ("vispruner", 16), ("vispruner", 4), ("visionzip", 16), ("divprune", 16), ("pooling", 16)}
CASES = [
    pytest.param(method, k, marks=() if (method, k) in CI_CASES else pytest.mark.slow)
    for method in METHODS
    for k in (40, 16, 4)
]


@pytest.mark.parametrize(("method", "num_tokens"), CASES)
def test_method_matches_library(testbed, reference, method, num_tokens):
    options = {"method": method, "num_tokens": num_tokens}
    requests = qwen_requests()
    want = library_results(*reference, requests, options)
    with engine(testbed, vispruner_options=options) as llm:
        got = vllm_results(llm, requests)
        chosen = vllm_kept(llm)
    assert_same(got, want)
    assert chosen == [image for r in want for image in r.kept]
    for request, result in zip(requests, want):
        unpruned = len(reference[1](images=request.images, text=[request.prompt])["input_ids"][0])
        removed = sum(tokens_of(image) - min(num_tokens, tokens_of(image)) for image in request.images)
        assert result.prompt_length == unpruned - removed


def test_chunked_prefill_and_prefix_caching_exact(testbed, reference):
    # Chunks of 8 tokens cut every image's kept tokens (16 each) across chunks: each chunk's rows get
    # their own positions. The second pass, one request at a time, takes the first block (32
    # tokens, images included) of the longer prompts from the prefix cache.
    options = {"method": "vispruner", "num_tokens": 16}
    requests = qwen_requests()
    want = library_results(*reference, requests, options)
    with engine(
        testbed, vispruner_options=options, enable_chunked_prefill=True, max_num_batched_tokens=8,
        enable_prefix_caching=True, block_size=32,
    ) as llm:
        first = vllm_results(llm, requests)
        second = [vllm_results(llm, [request])[0] for request in requests]
        cached = [output.num_cached_tokens for request in requests for output in _generate(llm, request)]
    assert_same(first, want)
    assert_same(second, want)
    # Prompts of more than one block (two or three images) reuse it; shorter ones have no full block.
    assert [count >= 32 for count in cached] == [result.prompt_length > 32 for result in want], cached
    assert sum(count >= 32 for count in cached) == 2


def _generate(llm, request):
    from vllm import SamplingParams

    data = {"image": request.images if len(request.images) > 1 else request.images[0]}
    return llm.generate({"prompt": request.prompt, "multi_modal_data": data}, SamplingParams(max_tokens=1), use_tqdm=False)


def test_refused_requests(testbed):
    import numpy as np

    request = qwen_requests()[0]
    with engine(testbed, vispruner_options={"method": "vispruner", "num_tokens": 16}) as llm:
        video = (np.zeros((4, 56, 56, 3), dtype=np.uint8), {"fps": 2.0, "total_num_frames": 4, "frames_indices": [0, 1, 2, 3]})
        with pytest.raises(ValueError, match="prunes Qwen-VL images only: a video would need K tokens per temporal group"):
            llm.generate({"prompt": request.prompt.replace("<image>", "<video>"), "multi_modal_data": {"video": video}}, use_tqdm=False)
        with pytest.raises(ValueError, match="must not end with an image"):
            _generate(llm, Request(request.prompt.split("<image>")[0] + "<image>", request.images))
        # The engine still serves after refusing.
        assert len(_generate(llm, request)[0].outputs[0].token_ids) == 1


def test_video_pruning_rate_refused(testbed):
    with pytest.raises(Exception, match="video_pruning_rate=0.5 switches on vLLM's own video pruning"):
        with engine(testbed, vispruner_options={"num_tokens": 16}, video_pruning_rate=0.5):
            pass


def test_runner_check_refuses_a_vllm_without_the_hook(monkeypatch):
    # What the position hook relies on is checked when a pruning engine starts; a vLLM whose runner
    # no longer calls recompute_mrope_positions is refused, naming the version tested.
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vispruner.vllm import runner

    runner.install()  # as vLLM's plugin loading does (idempotent)
    runner.check()
    monkeypatch.setattr(GPUModelRunner, "_gather_mm_embeddings", lambda self, scheduler_output: ([], None))
    with pytest.raises(RuntimeError, match=r"as tested on vLLM 0\.32\.0.*lacks: GPUModelRunner\._gather_mm_embeddings"):
        runner.check()
