"""Qwen3.5-MoE through the Qwen-VL matrix (tests/adapters/test_qwen.py runs it on every family at
the default method; here every vision method, cache, budget, and remove()).

Its routed experts see each token on its own, so a pruned prompt routes every kept token as the
hand-fed reference does; its linear-attention layers refuse FastV.
"""

from __future__ import annotations

import pytest
import torch

import vispruner

from ..tiny_qwen import BUILDERS, MIXED_PROMPTS, family_inputs
from . import test_qwen as qwen

#: The family in every test id, for the compatibility table (noxfile.py).
pytestmark = pytest.mark.parametrize("family", ["qwen3_5_moe"])


@pytest.mark.parametrize("method", qwen.VISION_METHODS)
def test_language_model_receives_text_and_kept_tokens(family, method):
    qwen.test_language_model_receives_text_and_kept_tokens(family, method)


@pytest.mark.parametrize(
    ("attn_implementation", "options"),
    [("eager", {}), ("sdpa", {"cache_implementation": "static"}), ("sdpa", {"use_cache": False})],
    ids=["eager", "static-cache", "no-cache"],
)
def test_greedy_tokens_match_reference(family, attn_implementation, options):
    qwen.test_greedy_tokens_match_reference(family, attn_implementation, options)


def test_a_whole_video_shares_one_budget(family):
    qwen.test_video_and_images_mixed(family, per_video=True)


def test_fastv_is_refused_for_the_linear_attention_layers(family):
    with pytest.raises(TypeError, match="fastv does not support Qwen3.5-MoE: it needs softmax attention in every decoder layer"):
        vispruner.apply(BUILDERS[family](text_layers=4), 4, method="fastv")


def test_remove_restores_the_stock_model(family):
    model = BUILDERS[family]()
    inputs = family_inputs(family, MIXED_PROMPTS)
    stock = model.generate(**inputs, max_new_tokens=qwen.STEPS, do_sample=False)
    def state():  # which instance attributes exist (rope_deltas changes value with each prompt)
        return [set(vars(owner)) for owner in (model, model.model)]

    before = state()
    vispruner.apply(model, 2)
    assert model.generate(**inputs, max_new_tokens=qwen.STEPS, do_sample=False).shape == stock.shape
    vispruner.remove(model)
    assert state() == before
    assert torch.equal(model.generate(**inputs, max_new_tokens=qwen.STEPS, do_sample=False), stock)
