"""The plugin on a tiny random LLaVA-OneVision against the library's transformers path: greedy tokens,
log-probs within 1e-4, kept indices and prompt lengths, for every vision-stage method at three
budgets, batched requests with images of different sizes (letterboxed, shrunk by anyres_max_9, one
crop's size), several images per prompt, and videos (frames pooled 2 x 2) of different lengths.

vLLM gives every image of a prompt its anyres crops; transformers does too when each image comes as
its own list entry (``batch_num_images`` of ones, as :func:`library_results` passes them), and
keeps only the base crop of each image when a prompt's images come as one nested list. The plugin
prunes what vLLM serves, so the reference is the former."""

import numpy as np
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

from .engines import (  # noqa: E402
    Request,
    assert_same,
    engine,
    library_results,
    load_reference,
    next_requests,
    save_tiny_onevision,
    vllm_kept,
    vllm_results,
)

METHODS = ["vispruner", "fastervlm", "visionzip", "divprune", "random", "pooling"]
#: (height, width) per image, per request: letterboxed on 2 x 3 crops; 4 x 4 crops shrunk to 21 x 21
#: tokens; one crop's size (the packed grid has the base crop's 7 x 7 shape); two and three images.
SIZES = [[(56, 84)], [(112, 112)], [(28, 28)], [(40, 100), (84, 56)], [(84, 28), (30, 30), (100, 60)]]
#: Engines take 2048 tokens: a 4 x 4-crop image alone is 511 placeholders unpruned.
LENGTH = 2048


@pytest.fixture(scope="module")
def tiny_onevision(tmp_path_factory):
    return save_tiny_onevision(tmp_path_factory.mktemp("tiny_onevision"))


@pytest.fixture(scope="module")
def reference(tiny_onevision):
    return load_reference(tiny_onevision)


def test_unpruned_engine_is_vllm_own(tiny_onevision, reference):
    # Without the override the plugin's subclass is vLLM's OneVision: the full prompt, transformers' tokens.
    requests = next_requests(SIZES)
    want = library_results(*reference, requests, None)
    with engine(tiny_onevision, max_model_len=LENGTH) as llm:
        got = vllm_results(llm, requests)
        assert llm.apply_model(lambda model: model.vispruner_settings) == [None]
    assert_same(got, want)


#: Each engine start costs 5-15 s here: CI runs VisPruner at every K and the others at K=16;
#: `-m slow` runs the rest.
CASES = [
    pytest.param({"method": m, "num_tokens": k}, marks=() if k == 16 or m == "vispruner" else pytest.mark.slow)
    for m in METHODS
    for k in (16, 6, 2)
]
CASES += [
    {"method": "vispruner", "num_tokens": 40, "budget": "per_image"},
    {"method": "visionzip", "keep_ratio": 0.3},
]


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_method_matches_library(tiny_onevision, reference, options):
    # An image of one crop's size has a 1 x 1 grid whose crop is the base crop's very pixels: with
    # budget="per_image" both pieces are one unit whose scores tie exactly, pair by pair, and torch's
    # unstable sort orders such ties by bits that vLLM's tower (1e-9 apart) does not reproduce.
    sizes = [s for s in SIZES if s != [(28, 28)]] if options.get("budget") == "per_image" else SIZES
    requests = next_requests(sizes)
    want = library_results(*reference, requests, options)
    with engine(tiny_onevision, vispruner_options=options, max_model_len=LENGTH) as llm:
        got = vllm_results(llm, requests)
        chosen = vllm_kept(llm)
    assert_same(got, want)
    assert chosen == [image for r in want for image in r.kept]


def test_prompt_holds_text_plus_budget_plus_newlines(tiny_onevision, reference):
    # Counted by hand. 28 x 28 px: the base crop (7 x 7) and a 1 x 1 grid, 7 x 7 with 7 newlines:
    # 105 placeholders unpruned, 6 + 6 + 7 with K=6. 112 x 112 px: 4 x 4 crops, a 28 x 28 canvas
    # shrunk by sqrt(16 / 9) to 21 x 21 with 21 newlines: 511 unpruned; the grid's budget is K for
    # each of its 16 crops: 6 + 96 + 21.
    requests = next_requests([[(28, 28)], [(112, 112)]])
    processor = reference[1]
    unpruned = [len(processor(images=r.images, text=[r.prompt])["input_ids"][0]) for r in requests]
    with engine(tiny_onevision, vispruner_options={"method": "vispruner", "num_tokens": 6}, max_model_len=LENGTH) as llm:
        got = vllm_results(llm, requests, max_tokens=1)
        chosen = vllm_kept(llm)
    assert [r.prompt_length for r in got] == [unpruned[0] - 105 + 19, unpruned[1] - 511 + 123]
    # The first image's packed grid has the base crop's shape: kept indices per piece, 6 each.
    assert [len(piece) for piece in chosen[0]] == [6, 6]
    assert [len(piece) for piece in chosen[1]] == [6 + 96]


def test_chunked_prefill_and_prefix_caching_exact(tiny_onevision, reference):
    # Chunks of 8 tokens cut every pruned image (19 to 123 tokens, newlines included) across
    # chunks; the second pass, one request at a time, takes whole 32-token blocks of the prompts,
    # images included, from the prefix cache. The 4 x 4-crop image's 123 tokens are more than vLLM's
    # dummy image would size the encoder cache for (120): the plugin's bound is what lets it in.
    from vllm import SamplingParams

    options = {"method": "vispruner", "num_tokens": 6}
    requests = next_requests(SIZES[:4])
    want = library_results(*reference, requests, options)
    with engine(
        tiny_onevision, vispruner_options=options, max_model_len=LENGTH, enable_chunked_prefill=True,
        max_num_batched_tokens=8, enable_prefix_caching=True, block_size=32,
    ) as llm:
        first = vllm_results(llm, requests)
        second = [vllm_results(llm, [request])[0] for request in requests]
        params = SamplingParams(max_tokens=1)
        cached = [
            llm.generate({"prompt": r.prompt, "multi_modal_data": {"image": r.images}}, params, use_tqdm=False)[0].num_cached_tokens
            for r in requests
        ]
    assert_same(first, want)
    assert_same(second, want)
    # Prompts of more than one block reuse it; the one-crop image's prompt has no full block.
    assert [count >= 32 for count in cached] == [result.prompt_length > 32 for result in want] == [True, True, False, True]


def test_check_sees_a_position_error(tiny_onevision, reference):
    # The negative control: the library numbering the same kept tokens by their unpruned positions
    # (positions="original"): prompts of the same length, which assert_same tells apart.
    options = {"method": "vispruner", "num_tokens": 6}
    requests = next_requests(SIZES[:3])
    shifted = library_results(*reference, requests, {**options, "positions": "original"})
    with engine(tiny_onevision, vispruner_options=options, max_model_len=LENGTH) as llm:
        got = vllm_results(llm, requests)
    assert [r.prompt_length for r in got] == [r.prompt_length for r in shifted]
    with pytest.raises(AssertionError):
        assert_same(got, shifted)


#: Videos of 4 and 6 frames (each frame 7 x 7 patches pooled to 4 x 4 tokens) and of two sizes; the
#: image and video processors resize frames to one crop.
VIDEO_CASES = [
    {"method": "vispruner", "num_tokens": 5},
    {"method": "visionzip", "num_tokens": 3},
    {"method": "vispruner", "num_tokens": 30, "budget": "per_image"},
    {"method": "divprune", "keep_ratio": 0.4},
    *(pytest.param({"method": m, "num_tokens": 3}, marks=pytest.mark.slow) for m in ("fastervlm", "divprune", "random", "pooling")),
]


def video_requests() -> tuple[list[Request], list[Request]]:
    """Two prompts with a video each, then one with an image and a video."""
    rng = np.random.default_rng(0)
    short, long = rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8), rng.integers(0, 256, (6, 40, 30, 3), dtype=np.uint8)
    image = next_requests(SIZES[:1])[0].images
    videos = [Request("w5 w6 <video> w7", [], [short]), Request("w9 <video> w10 w11 w12", [], [long])]
    return videos, [Request("w8 <image> w9 <video> w10", image, [long])]


@pytest.mark.parametrize("options", VIDEO_CASES, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_video_matches_library(tiny_onevision, reference, options):
    # vLLM embeds a batch's images and videos in calls of their own: the kept frames are read
    # after a batch of videos alone.
    videos, mixed = video_requests()
    want = library_results(*reference, videos + mixed, options)
    with engine(tiny_onevision, vispruner_options=options, max_model_len=LENGTH, limit_mm_per_prompt={"image": 1, "video": 1}) as llm:
        got = vllm_results(llm, videos)
        chosen = vllm_kept(llm)
        got += vllm_results(llm, mixed)
    assert_same(got, want)
    assert chosen == [image for r in want[: len(videos)] for image in r.kept]


def test_video_prompt_holds_budget_per_frame_plus_newline(tiny_onevision, reference):
    # 4 frames of 4 x 4 pooled tokens and a newline: 65 placeholders unpruned, 4 * 5 + 1 with K=5.
    videos, _ = video_requests()
    unpruned = len(reference[1](videos=videos[0].videos, text=[videos[0].prompt])["input_ids"][0])
    with engine(tiny_onevision, vispruner_options={"method": "vispruner", "num_tokens": 5}, max_model_len=LENGTH) as llm:
        got = vllm_results(llm, videos[:1], max_tokens=1)
    assert got[0].prompt_length == unpruned - 65 + 21


def test_refusals(tiny_onevision):
    with pytest.raises(Exception, match="positions='original' is not supported in vLLM"):
        with engine(tiny_onevision, vispruner_options={"num_tokens": 6, "positions": "original"}, max_model_len=LENGTH):
            pass
    with pytest.raises(Exception, match="base crop and its packed grid differ in width"):
        with engine(tiny_onevision, vispruner_options={"method": "pooling", "num_tokens": 6, "budget": "per_image"}, max_model_len=LENGTH):
            pass
