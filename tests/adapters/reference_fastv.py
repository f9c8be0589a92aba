"""A step-by-step FastV for tests, sharing no code with the adapter.

One unpadded row at a time, no cache, the decoder layers called one by one. The last prompt
token's attention in layer K-1 is read from that layer's full attention matrix, computed the
eager way; from layer K on only the text and the kept image tokens remain, at their original
positions. The prompt's embeddings and image layout come from :mod:`.reference` with every
patch kept (what the stock model feeds its language model).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .reference import _crops, image_layouts, reference_images, reference_sequences


def prompt_rows(model, inputs, budget: str = "per_crop") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: the prompt's embeddings (padding dropped) and the FastV group of each token:
    -1 for text and newlines, else the image (``per_image``) or the crop (``per_crop``), numbered
    over the batch."""
    pixel_values, sizes = inputs["pixel_values"], inputs.get("image_sizes")
    images = reference_images(model, pixel_values, sizes, num_tokens=10**6, method="random")
    rows = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    owners, crop_base = [], 0
    for index, (crops, layout) in enumerate(zip(_crops(model, pixel_values, sizes), image_layouts(model, inputs), strict=True)):
        owners.append([-1 if item is None else (index if budget == "per_image" else crop_base + item[0]) for item in layout])
        crop_base += len(crops)
    queue = iter(owners)
    result = []
    for embeds, sources in rows:
        groups, position = [], 0
        while position < len(sources):
            if sources[position] >= 0:
                groups.append(-1)
                position += 1
            else:
                image = next(queue)
                groups += image
                position += len(image)
        result.append((embeds, torch.tensor(groups)))
    return result


def _causal(length: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def _attention_probabilities(block, hidden: torch.Tensor, positions: torch.Tensor, rotary) -> torch.Tensor:
    """(H, n, n) attention probabilities of ``block`` on ``hidden`` (1, n, D)."""
    attention = block.self_attn
    normed = block.input_layernorm(hidden)
    length, width = hidden.shape[1], attention.head_dim
    query = attention.q_proj(normed).view(1, length, -1, width).transpose(1, 2)
    keys = attention.k_proj(normed).view(1, length, -1, width).transpose(1, 2)
    cos, sin = rotary(hidden, positions[None])
    query, keys = apply_rotary_pos_emb(query, keys, cos, sin)
    keys = keys.repeat_interleave(attention.num_key_value_groups, dim=1)
    logits = query @ keys.transpose(-1, -2) * attention.scaling + _causal(length, query.dtype)
    return logits.softmax(dim=-1)[0]


def fastv_logits(model, embeds: torch.Tensor, groups: torch.Tensor, layer: int, num_tokens: int):
    """``embeds`` (n, D): the prompt (``len(groups)`` tokens) then any generated tokens.

    Returns the logits (n', V) of the tokens that layers from ``layer`` on see, and keep (n,) bool.
    """
    language_model = model.get_decoder()
    prompt = len(groups)

    def choose(before: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        block = language_model.layers[layer - 1]
        row = _attention_probabilities(block, before, positions, language_model.rotary_emb)[:, prompt - 1].mean(0)
        keep = torch.ones(len(positions), dtype=torch.bool)
        for group in set(groups.tolist()) - {-1}:
            members = [i for i in range(prompt) if groups[i] == group]
            ranked = sorted(members, key=lambda i: (-float(row[i]), i))
            keep[ranked[num_tokens:]] = False
        return keep

    return pruned_logits(model, embeds, layer, choose)


def pruned_logits(model, embeds: torch.Tensor, layer: int, choose):
    """Run the decoder layers one by one on ``embeds`` (n, D), no cache; before layer ``layer``,
    ``choose(layer K-1's input, its output, positions)`` gives keep (n,) bool and only the kept
    tokens go on, at their original positions. Returns (logits (n', V), keep)."""
    language_model = model.get_decoder()
    hidden, positions = embeds[None], torch.arange(len(embeds))
    keep = torch.ones(len(embeds), dtype=torch.bool)
    with torch.no_grad():
        for index, block in enumerate(language_model.layers):
            if index == layer - 1:
                before = hidden
            if index == layer:
                keep = choose(before, hidden, positions)
                hidden, positions = hidden[:, keep], positions[keep]
            hidden = block(
                hidden,
                attention_mask=_causal(hidden.shape[1], hidden.dtype),
                position_embeddings=language_model.rotary_emb(hidden, positions[None]),
                position_ids=positions[None],
            )
        return model.lm_head(language_model.norm(hidden))[0], keep


def fastv_greedy(
    model, embeds: torch.Tensor, groups: torch.Tensor, layer: int, num_tokens: int, steps: int, run=None
):
    """Greedy tokens and the (steps, V) logits that chose them, re-running the whole row each step
    with ``run`` (default :func:`fastv_logits`; another LLM-stage method's reference of its shape)."""
    run = run or fastv_logits
    tokens: list[int] = []
    table = model.get_input_embeddings()
    for _ in range(steps):
        with torch.no_grad():
            sequence = torch.cat([embeds, table(torch.tensor(tokens, dtype=torch.long))])
        logits, _ = run(model, sequence, groups, layer, num_tokens)
        tokens.append(int(logits[-1].argmax()))
    with torch.no_grad():
        sequence = torch.cat([embeds, table(torch.tensor(tokens[:-1], dtype=torch.long))])
    logits, _ = run(model, sequence, groups, layer, num_tokens)
    return tokens, logits[-steps:]
