"""The plugin on a tiny random LLaVA-NeXT against the library's transformers path: both budgets,
newline tokens, several images per prompt, images that fill their crops (where the plugin's
choice among unpadded patches is the library's) and letterboxed ones (an independent count)."""

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed in this venv; .ci/vllm-tests.sh runs these tests in a venv of their own")

from vispruner.vllm.layout import NEWLINE, llava_next_layout  # noqa: E402

from .engines import (  # noqa: E402
    NEXT_CROP,
    NEXT_PINPOINTS,
    assert_same,
    engine,
    library_results,
    load_reference,
    next_requests,
    save_tiny_next,
    vllm_kept,
    vllm_results,
)

METHODS = ["vispruner", "fastervlm", "visionzip", "divprune", "random", "pooling"]
SIDE = 4  # patches per crop side
#: (height, width) images whose anyres grid they fill exactly: 2 x 2, 1 x 2 and 2 x 1 crops.
FILLING = [[(112, 112)], [(56, 112), (112, 56)], [(112, 112), (56, 112)], [(112, 56)]]


@pytest.fixture(scope="module")
def tiny_next(tmp_path_factory):
    return save_tiny_next(tmp_path_factory.mktemp("tiny_next"))


@pytest.fixture(scope="module")
def reference(tiny_next):
    return load_reference(tiny_next)


@pytest.mark.parametrize(
    "options",
    [
        # K=4 only for VisPruner in CI (each engine start costs 5-15 s; `-m slow` runs the rest).
        *(
            pytest.param({"method": m, "num_tokens": k}, marks=() if k == 16 or m == "vispruner" else pytest.mark.slow)
            for m in METHODS
            for k in (16, 4)
        ),
        {"method": "vispruner", "num_tokens": 6, "budget": "per_image"},
        {"method": "pooling", "num_tokens": 6, "budget": "per_image"},
        {"method": "visionzip", "keep_ratio": 0.3},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_matches_library_on_filling_images(tiny_next, reference, options):
    requests = next_requests(FILLING)
    want = library_results(*reference, requests, options)
    with engine(tiny_next, vispruner_options=options, max_model_len=512) as llm:
        got = vllm_results(llm, requests)
        chosen = vllm_kept(llm)
    assert_same(got, want)
    assert chosen == [image for r in want for image in r.kept]


def test_prompt_holds_text_plus_budget_per_crop_plus_newlines(tiny_next, reference):
    # A letterboxed image (3:2 on a 2 x 2 grid of crops): each crop spends its budget on the
    # patches unpadding keeps; the newlines (one per unpadded row) are all kept.
    requests = next_requests([[(84, 112)], [(112, 112)]])
    layout = llava_next_layout((84, 112), SIDE, NEXT_CROP, NEXT_PINPOINTS)
    rows = int((layout.packed == NEWLINE).sum())
    assert [s for s in layout.shapes] == [(4, 4), (3, 4), (3, 4), (3, 4), (3, 4)]  # 16 px of padding top and bottom
    unpruned = [len(reference[1](images=r.images, text=[r.prompt])["input_ids"][0]) for r in requests]
    with engine(tiny_next, vispruner_options={"method": "vispruner", "num_tokens": 5}, max_model_len=512) as llm:
        got = vllm_results(llm, requests, max_tokens=1)
        chosen = vllm_kept(llm)
    assert got[0].prompt_length == unpruned[0] - (16 + 4 * 12 + rows) + (5 * 5 + rows)
    assert got[1].prompt_length == unpruned[1] - (5 * 16 + 2 * SIDE) + (5 * 5 + 2 * SIDE)
    # Kept patches of the letterboxed image's crops lie inside the image, 5 per crop.
    first = chosen[0]
    assert [len(crop) for crop in first] == [5] * 5
    inside = {int(p) - crop * 16 for crop in range(1, 5) for p in layout.patches if int(p) // 16 == crop}
    assert all(index in inside or crop == 0 for crop, kept in enumerate(first) for index in kept)
