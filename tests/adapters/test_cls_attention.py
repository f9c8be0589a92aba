"""The hooked [CLS] row and keys equal what an eager run with output_attentions gives."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.tiny_models import tiny_inputs, tiny_llava
from vispruner.adapters.cls_attention import ClsAttentionCapture


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_hook_matches_eager_attention_probabilities(attn_implementation, layer):
    model = tiny_llava(attn_implementation=attn_implementation, vision_layers=3)
    tower = model.model.vision_tower
    pixels = tiny_inputs(model, ["<image> w1", "<image> w2"])["pixel_values"]
    with torch.no_grad(), ClsAttentionCapture(tower.encoder.layers[layer].self_attn, keep_keys=True) as capture:
        states = tower(pixels, output_hidden_states=True).hidden_states
    eager = copy.deepcopy(tower)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(pixels, output_attentions=True).attentions
        block = tower.encoder.layers[layer]
        keys = block.self_attn.k_proj(block.layer_norm1(states[layer]))
    expected = attentions[layer][:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(capture.scores(), expected, rtol=1e-5, atol=1e-7)
    per_head = keys[:, 1:].unflatten(-1, (block.self_attn.num_heads, block.self_attn.head_dim))
    torch.testing.assert_close(capture.keys(), per_head, rtol=1e-5, atol=1e-6)
    assert capture.scores().shape == (2, 64)


def test_without_keys_and_without_a_forward():
    model = tiny_llava()
    attention = model.model.vision_tower.encoder.layers[0].self_attn
    with ClsAttentionCapture(attention, keep_keys=False) as capture:
        pass
    with pytest.raises(RuntimeError, match="did not run"):
        capture.scores()
    assert not attention.q_proj._forward_hooks and not attention.k_proj._forward_hooks
    pixels = tiny_inputs(model, ["<image>"])["pixel_values"]
    with torch.no_grad(), ClsAttentionCapture(attention, keep_keys=False) as capture:
        model.model.vision_tower(pixels)
    assert capture.keys() is None
    assert capture.scores().shape == (1, 64)
