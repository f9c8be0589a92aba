"""CDPruner against the authors' golden masks and an independent step-by-step conditional-DPP loop."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from vispruner.methods import VisionSignals, get_method
from vispruner.methods.cdpruner import cdpruner_selection

from .strategies import near_duplicates

GOLDEN = "cdpruner_reference_subset.safetensors"
#: The authors' full public golden file (cases not bundled here), when this machine has it.
FULL = Path(os.environ.get("VISPRUNER_GOLDEN_DIR", "/work/shared/golden")) / "cdpruner_reference_public.safetensors"
#: Examples where the best two greedy gains (relative) are closer than this are skipped: float32
#: and float64 may legitimately order them differently.
MARGIN = 1e-4


def golden_cases(path: Path):
    with safe_open(path, "pt") as handle:
        for case in json.loads(handle.metadata()["golden"])["cases"]:
            prefix = f"case{case['case']:02d}."
            yield case, {name: handle.get_tensor(prefix + name) for name in ("image_features", "image_embeds", "text_embeds", "keep_mask", "greedy_order")}


def reference(features, image_embeds, text_embeds, num_tokens, theta=None, flip=True):
    """Step by step in float64, one row at a time, gains as Schur complements (no Cholesky
    updates): the token whose conditional variance ``L_jj - L_jS L_SS^-1 L_Sj`` is largest.
    Returns (B, N) keep, each row's greedy order, and the smallest relative gap between the
    best two gains of any step."""
    f, e, t = features.double(), image_embeds.double(), text_embeds.double()
    similarity = torch.nn.functional.normalize(f, dim=-1) @ torch.nn.functional.normalize(f, dim=-1).transpose(1, 2)
    cos = torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).T
    relevance = (-cos if flip else cos).mean(-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    if theta is not None:
        relevance = torch.exp(theta / (2 * (1 - theta)) * relevance)
    kernel = relevance[:, :, None] * similarity * relevance[:, None, :]
    keep = torch.zeros(features.shape[:2], dtype=torch.bool)
    orders, gap = [], math.inf
    for b in range(features.shape[0]):
        chosen: list[int] = []
        for _ in range(min(num_tokens, features.shape[1])):
            gains = kernel[b].diagonal().clone()
            if chosen:
                block = kernel[b][chosen][:, chosen]
                cross = kernel[b][chosen]
                gains -= (cross * torch.linalg.solve(block, cross)).sum(0)
            gains[chosen] = -math.inf
            best, second = torch.topk(gains, min(2, len(gains) - len(chosen))).values.tolist() + [-math.inf][: 2 - min(2, len(gains) - len(chosen))]
            gap = min(gap, (best - second) / abs(best))
            chosen.append(int(gains.argmax()))
        keep[b, chosen] = True
        orders.append(chosen)
    return keep, orders, gap


def test_bundled_golden_cases_are_reproduced(data_dir):
    cases = list(golden_cases(data_dir / GOLDEN))
    assert [case["case"] for case, _ in cases] == [5, 10]
    for case, tensors in cases:
        keep = cdpruner_selection(tensors["image_features"], tensors["image_embeds"], tensors["text_embeds"], case["num_tokens"], theta=case["theta"])
        assert torch.equal(keep, tensors["keep_mask"]), f"golden case {case['case']}"


def test_llava_next_crops_share_one_min_max(data_dir):
    # Case 10 is five crops of one call: crop by crop (per-crop min-max) the selection differs.
    case, tensors = next(c for c in golden_cases(data_dir / GOLDEN) if c[0]["case"] == 10)
    alone = torch.cat([
        cdpruner_selection(tensors["image_features"][b : b + 1], tensors["image_embeds"][b : b + 1], tensors["text_embeds"], 32)
        for b in range(5)
    ])
    assert not torch.equal(alone, tensors["keep_mask"])


@pytest.mark.skipif(not FULL.exists(), reason="the authors' full golden file is not on this machine")
def test_every_public_golden_case_is_reproduced():
    for case, tensors in golden_cases(FULL):
        keep = cdpruner_selection(tensors["image_features"], tensors["image_embeds"], tensors["text_embeds"], case["num_tokens"], theta=case["theta"])
        assert torch.equal(keep, tensors["keep_mask"]), f"golden case {case['case']}"


def test_reference_loop_reproduces_the_golden_greedy_order(data_dir):
    case, tensors = next(golden_cases(data_dir / GOLDEN))
    keep, orders, _ = reference(tensors["image_features"], tensors["image_embeds"], tensors["text_embeds"], case["num_tokens"])
    assert torch.equal(keep, tensors["keep_mask"])
    assert orders == tensors["greedy_order"].tolist()


@st.composite
def problems(draw):
    batch, tokens = draw(st.integers(1, 3)), draw(st.integers(2, 40))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dim, embed = draw(st.integers(2, 12)), draw(st.integers(2, 8))
    if draw(st.booleans()):
        features = near_duplicates(batch * tokens, dim, draw(st.integers(2, 6)), 0.1, generator).view(batch, tokens, dim)
    else:
        features = torch.randn(batch, tokens, dim, generator=generator)
    image_embeds = torch.randn(batch, tokens, embed, generator=generator)
    text_embeds = torch.randn(draw(st.integers(1, 4)), embed, generator=generator)
    theta = draw(st.sampled_from([None, 0.3, 0.5]))
    return features, image_embeds, text_embeds, draw(st.integers(1, tokens)), theta


@settings(max_examples=80, deadline=None)
@given(problems(), st.booleans())
def test_equals_the_step_by_step_reference(problem, flip):
    features, image_embeds, text_embeds, num_tokens, theta = problem
    # Within the kernel's rank: beyond it the gains are round-off (see the fallback tests).
    assume(num_tokens <= min(features.shape[1], features.shape[2]))
    expected, _, gap = reference(features, image_embeds, text_embeds, num_tokens, theta, flip)
    assume(gap > MARGIN)
    keep = cdpruner_selection(features, image_embeds, text_embeds, num_tokens, theta=theta, flip_relevance=flip)
    assert torch.equal(keep, expected)


@settings(max_examples=80, deadline=None)
@given(problems(), st.integers(0, 8))
def test_always_exactly_min_t_n_per_row(problem, extra):
    features, image_embeds, text_embeds, num_tokens, theta = problem
    num_tokens += extra  # also beyond N and beyond the kernel's rank
    keep = cdpruner_selection(features, image_embeds, text_embeds, num_tokens, theta=theta)
    assert keep.dtype == torch.bool and keep.shape == features.shape[:2]
    assert keep.sum(1).tolist() == [min(num_tokens, features.shape[1])] * features.shape[0]


def test_exact_duplicates_take_each_distinct_token_first_then_relevance():
    generator = torch.Generator().manual_seed(0)
    prototypes = torch.randn(12, 64, generator=generator)
    features = prototypes.repeat(48, 1)[torch.randperm(576, generator=generator)].unsqueeze(0)
    image_embeds, text_embeds = torch.randn(1, 576, 32, generator=generator), torch.randn(1, 32, generator=generator)
    for num_tokens in (12, 16, 64):
        keep = cdpruner_selection(features, image_embeds, text_embeds, num_tokens)
        assert int(keep.sum()) == num_tokens
        assert len({tuple(row) for row in features[0][keep[0]].tolist()}) == 12


def test_relevance_fallback_takes_the_most_relevant_rest():
    # Two distinct directions: after them the kernel is spent; the rest go by relevance.
    features = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
    image_embeds = torch.tensor([[[1.0], [-5.0], [2.0], [-1.0], [-3.0]]])
    image_embeds = torch.cat([image_embeds, torch.ones_like(image_embeds)], dim=-1)
    text_embeds = torch.tensor([[-1.0, 0.0]])  # relevance -cos(e, t): larger for e[..., 0] > 0
    keep = cdpruner_selection(features, image_embeds, text_embeds, 4)
    # DPP: the most relevant of each direction (tokens 2, then 0); then by relevance: 3, then 4.
    assert keep[0].tolist() == [True, False, True, True, True]


@pytest.mark.parametrize(
    "case",
    ["zero feature", "zero image embed", "zero text", "constant relevance", "T > N"],
)
def test_degenerate_inputs_keep_exactly_t(case):
    generator = torch.Generator().manual_seed(1)
    features, image_embeds = torch.randn(2, 16, 8, generator=generator), torch.randn(2, 16, 4, generator=generator)
    text_embeds, num_tokens = torch.randn(3, 4, generator=generator), 6
    if case == "zero feature":
        features[0, 3] = 0
    elif case == "zero image embed":
        image_embeds[1, 7] = 0
    elif case == "zero text":
        text_embeds.zero_()
    elif case == "constant relevance":
        image_embeds[:] = image_embeds[0, 0]
    else:
        num_tokens = 20
    keep = cdpruner_selection(features, image_embeds, text_embeds, num_tokens)
    assert keep.sum(1).tolist() == [min(num_tokens, 16)] * 2
    if case == "zero feature":
        assert not keep[0, 3]  # no diversity to add: never chosen by the DPP while it has rank


def test_constant_relevance_is_plain_diversity():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(1, 20, 6, generator=generator)
    constant = torch.ones(1, 20, 3)
    keep = cdpruner_selection(features, constant, torch.randn(2, 3, generator=generator), 4)
    # Relevance 1 everywhere: the kernel is the similarity alone, whatever the text.
    assert torch.equal(keep, cdpruner_selection(features, constant, torch.randn(5, 3, generator=generator), 4))
    assert keep.sum() == 4


def test_ties_go_to_the_lowest_index():
    # Orthogonal unit features, equal relevance: every gain ties; argmax takes the first.
    features = torch.eye(6).unsqueeze(0)
    image_embeds = torch.ones(1, 6, 2)
    keep = cdpruner_selection(features, image_embeds, torch.ones(1, 2), 3)
    assert keep[0].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_tokens": 0}, "num_tokens must be an integer >= 1"),
        ({"theta": 1.0}, r"theta must be None or a number in \(0, 1\)"),
        ({"text_embeds": torch.randn(2, 5)}, "share their last dimension"),
        ({"image_embeds": torch.randn(1, 7, 4)}, "leading dimensions"),
        ({"text_embeds": torch.full((2, 4), math.nan)}, "text_embeds must be finite"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, message):
    arguments = {"features": torch.randn(1, 8, 3), "image_embeds": torch.randn(1, 8, 4), "text_embeds": torch.randn(2, 4), "num_tokens": 2}
    with pytest.raises(ValueError, match=message):
        cdpruner_selection(**{**arguments, **kwargs})


def test_registered_method_uses_projected_tokens_and_the_instruction():
    generator = torch.Generator().manual_seed(3)
    projected, text = torch.randn(2, 12, 5, generator=generator), torch.randn(3, 5, generator=generator)
    method = get_method("cdpruner")
    assert method.needs == {"projected", "text"}
    keep = method.select(VisionSignals(torch.randn(2, 12, 4), projected=projected, text=text), 4).keep
    assert torch.equal(keep, cdpruner_selection(projected, projected, text, 4))
    assert not torch.equal(keep, cdpruner_selection(projected, projected, text, 4, flip_relevance=False))
    with pytest.raises(ValueError, match="needs the instruction's text embeddings"):
        method.select(VisionSignals(torch.randn(2, 12, 4), projected=projected), 4)
