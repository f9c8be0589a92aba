"""The plugin on a tiny random Gemma 3 against the library's transformers path: greedy tokens,
log-probs within 1e-4, prompt lengths (text + K per image, begin and end markers kept), kept
indices and the image blocks that attend bidirectionally, for every vision-stage method, batched
requests with one to three images of different sizes, pan-and-scan crops, chunked prefill.

vLLM 0.32's CPU attention has no bidirectional image blocks (no ``mm_prefix`` support): on CPU
vLLM runs Gemma 3's image tokens causally, pruned or not. The tokens and log-probs are therefore
compared with the library's path run the same way (``token_type_ids`` left out, so transformers
masks images causally too), and the blocks an ``mm_prefix`` backend (vLLM's GPU backends) makes
bidirectional are checked against the library's: the runs of its compacted ``token_type_ids``.
"""

from contextlib import contextmanager

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

import torch  # noqa: E402

import vispruner  # noqa: E402
from tests.tiny_models import random_images  # noqa: E402

from .engines import (  # noqa: E402
    GEMMA_TOKENS,
    Request,
    assert_same,
    engine,
    library_results,
    load_reference,
    save_tiny_gemma3,
    vllm_results,
)

METHODS = ["vispruner", "fastervlm", "visionzip", "divprune", "random", "pooling"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_gemma3(tmp_path_factory.mktemp("tiny_gemma3"))


@pytest.fixture(scope="module")
def reference(tiny):
    return load_reference(tiny)


class CausalImages:
    """The processor without ``token_type_ids``: transformers then masks Gemma 3's image tokens
    causally, as vLLM's CPU attention does. ``kwargs`` go to every call (pan-and-scan's options)."""

    def __init__(self, processor, **kwargs):
        self.processor = processor
        self.kwargs = kwargs

    def __call__(self, **kwargs):
        inputs = self.processor(**kwargs, **self.kwargs)
        del inputs["token_type_ids"]
        return inputs


def gemma_requests() -> list[Request]:
    """Prompts of different lengths with two, one, three and one images of different sizes (the
    processor resizes each to the tower's 64 px)."""
    images = random_images([(64, 64), (50, 80), (80, 40), (96, 96), (40, 64), (64, 120), (72, 48)], seed=2)
    return [
        Request("w5 w6 <boi> w7 <boi> w8", images[:2]),
        Request("w9 <boi> w10 w11", images[2:3]),
        Request("w20 w21 w22 <boi> w23 <boi> w24 <boi> w30", images[3:6]),
        Request("w12 w13 w14 w15 <boi> w16", images[6:]),
    ]


def library_blocks(model, processor, request: Request, options: dict, **kwargs) -> list[tuple[int, int]]:
    """The image blocks (first, last token, inclusive) of the library's pruned prompt: the runs of
    its compacted ``token_type_ids``, which its mask makes bidirectional."""
    vispruner.apply(model, **options)
    try:
        inputs = processor(images=request.images, text=[request.prompt], return_tensors="pt", **kwargs)
        with torch.no_grad():
            model(**inputs)
        kept = vars(model)["_vispruner"].last_tokens[0]
    finally:
        vispruner.remove(model)
    image = inputs["token_type_ids"][0][kept] == 1
    edges = torch.diff(image.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    return list(zip((edges == 1).nonzero().flatten().tolist(), ((edges == -1).nonzero().flatten() - 1).tolist()))


@contextmanager
def bidirectional_ranges(monkeypatch):
    """Per scheduler step, the image ranges vLLM's runner hands its attention backend to attend
    bidirectionally ({request index: [(first, last)]}; the CPU backend ignores them)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    steps = []
    original = CPUAttentionMetadataBuilder.build

    def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
        steps.append(common_attn_metadata.mm_req_doc_ranges)
        return original(self, common_prefix_len, common_attn_metadata, *args, **kwargs)

    monkeypatch.setattr(CPUAttentionMetadataBuilder, "build", build)
    yield steps


def record_selections(model) -> list:
    """Every selection of ``model``'s pruned vision calls from now on (vLLM may encode a batch's
    images over several calls; ``vispruner_last`` holds the last one)."""
    calls = []
    original = model.embed_multimodal

    def embed_multimodal(**kwargs):
        embeddings = original(**kwargs)
        calls.extend(model.vispruner_last)
        return embeddings

    model.embed_multimodal = embed_multimodal
    return calls


def test_cpu_attention_runs_images_causally(tiny, reference):
    # vLLM's own Gemma 3 (no override): the causal reference exactly; the library's path as shipped
    # (bidirectional image blocks) is further than 1e-4, so the comparison can fail. If a vLLM CPU
    # build gains bidirectional blocks this test says so, and the others should compare with the
    # library's path as shipped.
    model, processor = reference
    requests = gemma_requests()
    with engine(tiny) as llm:
        got = vllm_results(llm, requests)
        assert llm.apply_model(lambda model: model.vispruner_settings) == [None]
    assert_same(got, library_results(model, CausalImages(processor), requests, None))
    with pytest.raises(AssertionError):
        assert_same(got, library_results(model, processor, requests, None))


#: As for the other families (an engine start and check costs 3-4 s with this tiny model): CI runs
#: VisPruner at every K and the methods with their own signals (keys and merged features, projected
#: tokens, the grid) at K=6; `-m slow` runs the rest.
CI_CASES = {("vispruner", 12), ("vispruner", 6), ("vispruner", 2), ("visionzip", 6), ("divprune", 6), ("pooling", 6)}
CASES = [
    pytest.param(method, k, marks=() if (method, k) in CI_CASES else pytest.mark.slow)
    for method in METHODS
    for k in (12, 6, 2)
]


def check_against_library(tiny, reference, monkeypatch, options, requests, crops, kept, processing=None):
    """vLLM with the override against the library's path (``processing``: the processor's options,
    also given to vLLM): tokens, log-probs, kept indices per tower input, prompt lengths (``crops``:
    per request, its tower inputs; ``kept``: tokens each keeps) and the bidirectional ranges."""
    model, processor = reference
    processing = processing or {}
    want = library_results(model, CausalImages(processor, **processing), requests, options)
    engine_options = {"mm_processor_kwargs": processing} if processing else {}
    with bidirectional_ranges(monkeypatch) as steps, engine(tiny, vispruner_options=options, **engine_options) as llm:
        (calls,) = llm.apply_model(record_selections)
        got = vllm_results(llm, requests)
    assert_same(got, want)
    assert [[row.tolist() for row in selection.indices] for selection in calls] == [
        crop for result in want for crop in result.kept
    ]
    for request, result, count in zip(requests, want, crops):
        unpruned = len(processor(images=request.images, text=[request.prompt], **processing)["input_ids"][0])
        assert result.prompt_length == unpruned - (GEMMA_TOKENS - kept) * count
    # The prompts prefill in one step: each one's bidirectional ranges are its tower inputs' K kept
    # image tokens, the library's image blocks.
    blocks = sorted(library_blocks(model, processor, request, options, **processing) for request in requests)
    assert sorted(steps[0].values()) == blocks
    assert sum(len(ranges) for ranges in blocks) == sum(crops)
    assert all(last - first + 1 == kept for ranges in blocks for first, last in ranges)


@pytest.mark.parametrize(("method", "num_tokens"), CASES)
def test_method_matches_library(tiny, reference, monkeypatch, method, num_tokens):
    requests = gemma_requests()
    crops = [len(request.images) for request in requests]
    options = {"method": method, "num_tokens": num_tokens}
    check_against_library(tiny, reference, monkeypatch, options, requests, crops, num_tokens)


@pytest.mark.parametrize(
    ("options", "kept"),
    [({"method": "vispruner", "keep_ratio": 0.3}, 5), ({"method": "pooling", "num_tokens": 6, "budget": "per_image"}, 6)],
)
def test_keep_ratio_and_per_image_budget(tiny, reference, monkeypatch, options, kept):
    # keep_ratio rounds 0.3 x 16 half up; a Gemma 3 image is one tower input, so per image is per crop.
    requests = gemma_requests()
    check_against_library(tiny, reference, monkeypatch, options, requests, [len(r.images) for r in requests], kept)


@pytest.mark.parametrize("method", ["vispruner", "visionzip"])
def test_pan_and_scan_matches_library(tiny, reference, monkeypatch, method):
    # Crops of 32 px and more: the 40 x 100 image gets 3 crops, the 100 x 50 one 2, the square none.
    # Each tower input (image or crop) keeps K tokens between its own markers.
    images = random_images([(40, 100), (64, 64), (100, 50)], seed=4)
    requests = [Request("w5 <boi> w6", images[:1]), Request("w7 w8 <boi> w9 <boi> w10", images[1:])]
    processing = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}
    options = {"method": method, "num_tokens": 6}
    check_against_library(tiny, reference, monkeypatch, options, requests, [1 + 3, 1 + (1 + 2)], 6, processing)


def cached_tokens(llm, request: Request) -> int:
    from vllm import SamplingParams

    data = {"image": request.images if len(request.images) > 1 else request.images[0]}
    (output,) = llm.generate({"prompt": request.prompt, "multi_modal_data": data}, SamplingParams(max_tokens=1), use_tqdm=False)
    return output.num_cached_tokens


def test_chunked_prefill_prefix_caching_and_position_control(tiny, reference):
    model, processor = reference
    options = {"method": "vispruner", "num_tokens": 6}
    requests = gemma_requests()
    want = library_results(model, CausalImages(processor), requests, options)
    # Negative control: the library's kept tokens at their unpruned positions. The tokens may agree;
    # the log-probs do not, and the check fails.
    moved = library_results(model, CausalImages(processor), requests, {**options, "positions": "original"})
    # vLLM raises a prefix-LM model's batch to hold a whole image: the chunks cut the prompts' text.
    # The second pass, one request at a time, takes blocks of 16 tokens, images included, from the
    # prefix cache where vLLM cached them.
    with engine(
        tiny, vispruner_options=options, enable_chunked_prefill=True, max_num_batched_tokens=8,
        enable_prefix_caching=True, block_size=16,
    ) as llm:
        got = vllm_results(llm, requests)
        again = [vllm_results(llm, [request])[0] for request in requests]
        cached = [cached_tokens(llm, request) for request in requests]
    assert_same(got, want)
    assert_same(again, want)
    # vLLM decides which blocks it caches (here: 32 tokens of the three-image prompt); some are reused.
    assert max(cached) >= 16, cached
    with pytest.raises(AssertionError):
        assert_same(got, moved)


def test_original_positions_refused_at_start(tiny):
    refused = pytest.raises(Exception, match="positions='original' is not supported in vLLM for Gemma 3 images")
    with refused, engine(tiny, vispruner_options={"num_tokens": 6, "positions": "original"}):
        pass


@pytest.mark.parametrize("flag", ["compile_mm_encoder", "cudagraph_mm_encoder"])
def test_compiled_tower_refused_at_start(tiny, flag):
    refused = pytest.raises(Exception, match=f"compilation_config.{flag}=True runs the vision tower compiled or as a CUDA graph")
    with refused, engine(tiny, vispruner_options={"num_tokens": 6}, compilation_config={flag: True}):
        pass


def test_layout_check_names_what_is_missing():
    # A pruning engine checks at start-up that vLLM's tower and projector have what the hooks read.
    from types import SimpleNamespace

    from vispruner.vllm.gemma3 import PrunableGemma3ForConditionalGeneration

    model = SimpleNamespace(_vispruner_attention=SimpleNamespace(), multi_modal_projector=SimpleNamespace())
    with pytest.raises(RuntimeError, match=r"as laid out in vLLM 0\.32\.0; this vLLM lacks: the tower's last self_attn\.qkv_proj"):
        PrunableGemma3ForConditionalGeneration._vispruner_check_layout(model)
