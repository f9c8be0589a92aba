"""A step-by-step reference for the families of issue 23, sharing no code with the adapters:
InternVL (InternViT with [CLS], pixel shuffle 2 x 2), SmolVLM / Idefics3 (SigLIP without [CLS],
pixel shuffle 2 x 2 in the connector) and Mistral 3 (Pixtral: images of their own sizes in one
sequence with 2D rotary positions, a 2 x 2 patch merger).

The tower's features come from ``output_hidden_states``; the [CLS] row (InternVL) or the mean
attention each patch receives (SmolVLM) from an eager copy of the tower with
``output_attentions``; keys from the layer's own norm, key projection (and key norm). The
2 x 2 grouping is written out by hand (a token is patches (2r, 2c), (2r, 2c + 1), (2r + 1, 2c),
(2r + 1, 2c + 1), concatenated; its signal their mean), checked against the stock model's tokens.
The registered method chooses per tile; the kept tokens are the stock model's (merged ones
projected by hand) laid into each prompt placeholder by placeholder, and the language model runs on one unpadded row at a
time without a cache (tests/adapters/reference.py).
"""

from __future__ import annotations

import copy

import torch

from vispruner.methods import VisionSignals, get_method


def group_2x2(values: torch.Tensor, side: int, mean: bool) -> torch.Tensor:
    """(n, side * side, ...) per patch -> (n, (side / 2)^2, ...) per token: the mean of its 4
    patches (``mean``) or their rows concatenated."""
    count, _, *trailing = values.shape
    grid = values.reshape(count, side // 2, 2, side // 2, 2, *trailing).movedim(3, 2)  # (n, r, c, 2, 2, ...)
    grid = grid.reshape(count, (side // 2) ** 2, 4, *trailing)
    return grid.mean(dim=2) if mean else grid.flatten(2)


def internvl_signals(model, pixels: torch.Tensor):
    """features (n, T, 4C), [CLS] attention (n, T) and keys (n, T, H, d), per token."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    count = len(tower.encoder.layer)
    index = layer if layer >= 0 else count + 1 + layer
    with torch.no_grad():
        states = tower(pixels, output_hidden_states=True)
        eager = copy.deepcopy(tower)
        eager.set_attn_implementation("eager")
        attention = eager(pixels, output_attentions=True).attentions[index - 1]
        block = tower.encoder.layer[index - 1]
        keys = block.attention.k_norm(block.attention.k_proj(block.layernorm_before(states.hidden_states[index - 1])))
    features = states.last_hidden_state if layer == -1 else states.hidden_states[index]
    side = int((features.shape[1] - 1) ** 0.5)
    heads = block.attention.num_heads
    keys = keys[:, 1:].unflatten(-1, (heads, keys.shape[-1] // heads))
    return (
        group_2x2(features[:, 1:], side, mean=False),
        group_2x2(attention[:, :, 0, 1:].mean(dim=1), side, mean=True),
        group_2x2(keys, side, mean=True),
    )


def internvl_tiles(model, pixel_values, method="vispruner", num_tokens=4, **options) -> list[torch.Tensor]:
    """Per tile: its tokens (T, D), merged ones re-projected, and which it keeps (T,)."""
    features, scores, keys = internvl_signals(model, pixel_values)
    with torch.no_grad():
        stock = model.model.get_image_features(pixel_values).pooler_output
    return _chosen(model.model.multi_modal_projector, features, scores, keys, stock, method, num_tokens, **options)


def smolvlm_tiles(model, pixel_values, method="vispruner", num_tokens=4, **options) -> list[torch.Tensor]:
    """Per real tile (all-zero padding tiles dropped): its tokens (T, D) and which it keeps (T,)."""
    tiles = pixel_values.flatten(0, 1)
    tiles = tiles[(tiles != 0).flatten(1).any(dim=1)]
    tower = model.model.vision_model
    with torch.no_grad():
        states = tower(tiles, output_hidden_states=True)
        eager = copy.deepcopy(tower)
        eager.set_attn_implementation("eager")
        attention = eager(tiles, output_attentions=True).attentions[-1]
        block = tower.encoder.layers[-1]
        keys = block.self_attn.k_proj(block.layer_norm1(states.hidden_states[-2]))
        stock = torch.cat(list(model.model.get_image_features(pixel_values).pooler_output))
    side = int(tiles.shape[-1] // model.config.vision_config.patch_size)
    heads = block.self_attn.num_heads
    features = group_2x2(states.last_hidden_state, side, mean=False)
    scores = group_2x2(attention.mean(dim=(1, 2)), side, mean=True)
    keys = group_2x2(keys.unflatten(-1, (heads, keys.shape[-1] // heads)), side, mean=True)
    stock = stock.view(len(tiles), -1, stock.shape[-1])
    return _chosen(model.model.connector.modality_projection, features, scores, keys, stock, method, num_tokens, **options)


def mistral3_images(model, pixel_values, image_sizes, method="vispruner", num_tokens=4, **options) -> list:
    """Per image: its tokens (T, D), merged ones re-projected, and which it keeps (T,).

    The received attention is the eager attention's mean over heads and over the image's own
    queries (the mask is block-diagonal); the keys get the rotary embedding of each patch's
    (row, column), as the layer applies it. A merge group is the 2 x 2 patches (2r..2r+1,
    2c..2c+1); the merging layer's input holds them channel by channel (each channel's 4 values
    in raster order), as ``unfold`` lays them out.
    """
    from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    patch = model.config.vision_config.patch_size
    grids = [(int(h) // patch, int(w) // patch) for h, w in image_sizes.tolist()]
    with torch.no_grad():
        states = tower(pixel_values, image_sizes=image_sizes, output_hidden_states=True).hidden_states
        eager = copy.deepcopy(tower)
        eager.set_attn_implementation("eager")
        attention = eager(pixel_values, image_sizes=image_sizes, output_attentions=True).attentions[-1][0]
        block = tower.transformer.layers[-1]
        heads, width = block.attention.num_heads, block.attention.head_dim
        keys = block.attention.k_proj(block.attention_norm(states[-2]))[0].view(-1, heads, width).transpose(0, 1)
        positions = torch.cat([torch.cartesian_prod(torch.arange(h), torch.arange(w)) for h, w in grids])
        cos, sin = tower.patch_positional_embedding(keys, positions)
        keys = apply_rotary_pos_emb(keys, keys, cos, sin, unsqueeze_dim=0)[0].transpose(0, 1)  # (L, H, d)
        normed = projector.norm(states[-1][0])
        stock = model.model.get_image_features(pixel_values, image_sizes).pooler_output

    def project(merged):
        return projector.linear_2(projector.act(projector.linear_1(projector.patch_merger.merging_layer(merged))))

    def groups(values, h, w, mean):  # (h * w, K) -> (h/2 * w/2, K) means, or (.., K * 4) channel by channel
        grid = values.reshape(h // 2, 2, w // 2, 2, -1).permute(0, 2, 4, 1, 3).reshape((h // 2) * (w // 2), -1, 4)
        return grid.mean(dim=-1) if mean else grid.flatten(1)

    images, start = [], 0
    for (h, w), tokens in zip(grids, stock):
        segment = slice(start, start + h * w)
        start += h * w
        features = groups(normed[segment], h, w, mean=False)
        scores = groups(attention[:, segment, segment].mean(dim=(0, 1)).unsqueeze(-1), h, w, mean=True)[:, 0]
        image_keys = groups(keys[segment].flatten(1), h, w, mean=True).unflatten(-1, (heads, width))
        items = _chosen(project, features[None], scores[None], image_keys[None], tokens[None], method, num_tokens,
                        grid=(h // 2, w // 2), **options)
        images += items
    return images


def _chosen(projector, features, scores, keys, stock, method, num_tokens, grid=None, **options) -> list:
    """Per unit of (n, T, ...) signals: (tokens (T, D), keep (T,)); ``grid`` default square."""
    with torch.no_grad():
        torch.testing.assert_close(projector(features), stock, rtol=1e-5, atol=1e-5)  # the grouping is the model's
    side = int(features.shape[1] ** 0.5)
    grid = (side, side) if grid is None else grid
    selection = get_method(method).select(VisionSignals(features, scores, keys, grid, stock), num_tokens, **options)
    tiles = []
    for index, keep in enumerate(selection.keep):
        tokens = stock[index].clone()
        if selection.features is not None:
            changed = (selection.features[index] != features[index]).any(dim=-1)
            with torch.no_grad():
                tokens[changed] = projector(selection.features[index][changed])
        tiles.append((tokens, keep))
    return tiles


def placeholder_rows(model, input_ids, attention_mask, items: list[tuple[torch.Tensor, torch.Tensor]]):
    """Per row: (embeddings, source ids) of the unpadded prompt with each placeholder replaced by
    its item's token where the item keeps it and dropped where not; ``items`` are (tokens (P, D),
    keep (P,)) in reading order over the batch, P placeholders each. Source -1 for an image token."""
    image_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    flat = [(token, kept) for tokens, keep in items for token, kept in zip(tokens, keep.tolist())]
    queue = iter(flat)
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        parts, sources = [], []
        for token_id in ids[mask.bool()].tolist():
            if token_id == image_id:
                token, kept = next(queue)
                if kept:
                    parts.append(token[None])
                    sources.append(-1)
            else:
                with torch.no_grad():
                    parts.append(embed(torch.tensor([token_id])))
                sources.append(token_id)
        rows.append((torch.cat(parts), torch.tensor(sources)))
    assert next(queue, None) is None, "more items than placeholders"
    return rows
