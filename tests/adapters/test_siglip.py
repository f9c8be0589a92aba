"""Gemma 3 and LLaVA-OneVision (SigLIP towers, no [CLS]) against the step-by-step reference
(tests/adapters/reference_siglip.py): the language model's input embeddings and greedy tokens."""

from __future__ import annotations

import pytest
import torch

import vispruner
from vispruner.adapters.siglip import ReceivedAttentionCapture

from . import reference_siglip as ref
from .siglip_cases import CASES, STEPS, gemma_case, language_inputs, onevision_case, reference_rows, video_case
from ..tiny_models import tiny_gemma3


#: Each signal a method reads, on each case: attention (vispruner), keys and merging (visionzip),
#: the language model's tokens (divprune), the grid (pooling); per image (a whole video) as well.
RUNS = [
    *[("gemma3", method, "per_crop") for method in ("vispruner", "visionzip", "divprune", "pooling")],
    ("onevision", "vispruner", "per_crop"),
    ("onevision", "visionzip", "per_crop"),
    ("onevision", "fastervlm", "per_image"),
    ("onevision_downsampled", "vispruner", "per_crop"),
    ("onevision_downsampled", "divprune", "per_crop"),
    ("onevision_downsampled", "pooling", "per_crop"),
    ("onevision_video", "visionzip", "per_crop"),
    ("onevision_video", "pooling", "per_crop"),
    ("onevision_video", "vispruner", "per_image"),
    ("onevision_mixed", "visionzip", "per_crop"),
]


@pytest.mark.parametrize("case, method, budget", RUNS)
def test_against_reference(case, method, budget):
    model, inputs = CASES[case]()
    rows = reference_rows(model, inputs, method, 5, budget)
    vispruner.apply(model, 5, method=method, budget=budget)
    out, seen = language_inputs(model, inputs)
    for (embeds, types), row, generated in zip(rows, seen, out[:, -STEPS:].tolist(), strict=True):
        torch.testing.assert_close(row, embeds, rtol=1e-5, atol=1e-5)
        assert ref.greedy(model, embeds, types, STEPS) == generated


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_received_attention_matches_eager(attn_implementation):
    """The hooked signal equals the eager attention probabilities averaged over heads and queries."""
    model = tiny_gemma3(attn_implementation=attn_implementation)
    pixels = torch.randn(2, 3, 64, 64)
    layer = model.model.vision_tower.encoder.layers[-1].self_attn
    with ReceivedAttentionCapture(layer, keep_keys=True) as capture, torch.no_grad():
        model.model.vision_tower(pixels)
    _, expected, keys = ref.tower_signals(model, pixels, -1, normed=True)
    torch.testing.assert_close(capture.scores(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(capture.keys(), keys, rtol=0, atol=0)


def test_keep_ratio_and_remove():
    """keep_ratio is a share of each piece (a frame here); remove restores the stock model exactly."""
    model, inputs = video_case()
    stock = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    vispruner.apply(model, keep_ratio=0.25, method="random")
    model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
    assert [s.keep.sum(dim=1).tolist() for s in vispruner.last_selection(model)] == [[4] * 3] * 2
    vispruner.remove(model)
    assert torch.equal(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False), stock)


def test_refused_settings():
    model, inputs = onevision_case(((30, 100),), ["w1 <image> w2"])
    vispruner.apply(model, 5, method="pooling", budget="per_image")
    with pytest.raises(ValueError, match="needs the patch grid"):
        model.generate(**inputs, max_new_tokens=1)  # a base crop and a packed grid of other widths
    vispruner.apply(model, 5)
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        model(**inputs, vision_feature_select_strategy="default")


def test_loss_with_labels():
    """Gemma 3's loss over the text targets of the pruned prompt (bidirectional image blocks kept)."""
    model, inputs = gemma_case()
    image_id = model.config.image_token_id
    first = inputs["attention_mask"].cumsum(dim=1) == 1  # predicted from padding in a left-padded batch
    ignored = (inputs["input_ids"] == image_id) | (inputs["attention_mask"] == 0) | first
    labels = inputs["input_ids"].masked_fill(ignored, -100)
    rows = reference_rows(model, inputs, "vispruner", 5)
    total, count = 0.0, 0
    for (embeds, types), ids, mask in zip(rows, inputs["input_ids"], inputs["attention_mask"]):
        text = iter(ids[mask.bool() & (ids != image_id)].tolist())
        targets = torch.tensor([next(text) if kind == 0 else -100 for kind in types.tolist()])[1:]
        logits = ref.lm_logits(model, embeds, types)[:-1]
        total = total + torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    vispruner.apply(model, 5)
    # Positions counted from each row's first real token, as the reference's unpadded rows have them.
    positions = (inputs["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        loss = model(**inputs, labels=labels, position_ids=positions).loss
    torch.testing.assert_close(loss, total / count, rtol=1e-5, atol=1e-6)
