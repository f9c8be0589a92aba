"""A step-by-step reference for pruned Gemma 4, sharing no code with the adapters.

The pooled, standardised features are the stock encoder's output; the attention each patch
receives is the mean, over heads and over its image's real patches, of an eager copy's
``output_attentions`` in the last layer; the keys are the layer's norm, key projection and key
norm with the 2D rotary embedding written out (first half of each head by x, second by y). A
token is the mean of the 2 x 2 patches (2r..2r+1, 2c..2c+1) of its image's patch grid, written out
by hand. The registered method chooses per image (per frame of a video). The kept tokens are laid
into each prompt placeholder by placeholder (audio placeholders get the stock audio tower's
tokens); the language model runs on one unpadded row at a
time without a cache, with the per-layer inputs of its ids (visual tokens read as padding), its
masks built by hand (causal; the sliding-window layers also bidirectional within each image's
run of tokens) and the logits soft-capped. A generated placeholder id (the tiny vocabulary is
small) reads as padding, as the stock model reads it.
"""

from __future__ import annotations

import copy

import torch

from vispruner.methods import VisionSignals, get_method


def _rope(values: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """(N, H, d) rotated by (N, 2) (x, y) positions: channels [0, d/2) by x, [d/2, d) by y, each
    half as rotate-half RoPE with d/4 frequencies."""
    half = values.shape[-1] // 2
    frequencies = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)
    parts = []
    for axis in range(2):
        part = values[..., axis * half : (axis + 1) * half]
        angles = positions[:, axis, None].float() * frequencies  # (N, d/4)
        cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
        rotated = torch.cat([-part[..., half // 2 :], part[..., : half // 2]], dim=-1)
        parts.append(part * cos + rotated * sin)
    return torch.cat(parts, dim=-1)


def _pool(values: torch.Tensor, rows: int, cols: int, kernel: int) -> torch.Tensor:
    """(rows * cols, ...) per patch in raster order -> (rows/k * cols/k, ...) window means."""
    grid = values.reshape(rows // kernel, kernel, cols // kernel, kernel, *values.shape[1:])
    return grid.transpose(1, 2).reshape((rows // kernel) * (cols // kernel), kernel * kernel, *values.shape[1:]).mean(1)


def gemma4_units(model, pixels, positions, method="vispruner", num_tokens=4, budget="per_crop", frames=None, **options):
    """Per unit (an image or frame; with ``budget="per_image"`` and ``frames``, a video): its
    tokens (T, D), merged ones re-projected, and which it keeps (T,)."""
    tower = model.model.vision_tower
    kernel = model.config.vision_config.pooling_kernel_size
    block = tower.encoder.layers[-1]
    attention = block.self_attn
    seen = {}
    handle = block.register_forward_pre_hook(lambda module, args: seen.setdefault("input", args[0]))
    with torch.no_grad():
        try:
            features = tower(pixels, pixel_position_ids=positions).last_hidden_state
        finally:
            handle.remove()
        eager = copy.deepcopy(tower)
        eager.set_attn_implementation("eager")
        attentions = eager(pixels, pixel_position_ids=positions, output_attentions=True).attentions[-1]
        keys = attention.k_proj(block.input_layernorm(seen["input"]))
        keys = attention.k_norm(keys.unflatten(-1, (-1, attention.head_dim)))
        tokens = model.model.embed_vision(features)
    theta = model.config.vision_config.rope_parameters["rope_theta"]
    per_frame, start = [], 0
    for index in range(len(pixels)):
        real = (positions[index] != -1).all(dim=-1)
        where = positions[index][real]
        cols, rows = (int(v) + 1 for v in where.max(dim=0).values)
        count = (rows // kernel) * (cols // kernel)
        received = attentions[index][:, real][:, :, real].mean(dim=(0, 1))
        frame_keys = _rope(keys[index][real], where, theta)
        frame_keys = frame_keys.repeat_interleave(attention.config.num_attention_heads // frame_keys.shape[1], dim=1)
        per_frame.append((
            features[start : start + count], _pool(received, rows, cols, kernel), _pool(frame_keys, rows, cols, kernel),
            tokens[start : start + count], (rows // kernel, cols // kernel),
        ))
        start += count
    assert start == len(features)
    groups = [[unit] for unit in per_frame]
    if budget == "per_image" and frames is not None:
        bounds = torch.tensor([0, *frames]).cumsum(0).tolist()
        groups = [per_frame[a:b] for a, b in zip(bounds, bounds[1:])]
    units = []
    for group in groups:
        feats, scores, unit_keys, unit_tokens = (torch.cat([unit[i] for unit in group]) for i in range(4))
        grid = (sum(unit[4][0] for unit in group), group[0][4][1])
        signals = VisionSignals(feats[None], scores[None], unit_keys[None], grid, unit_tokens[None])
        selection = get_method(method).select(signals, num_tokens, **options)
        chosen = unit_tokens.clone()
        if selection.features is not None:
            changed = (selection.features[0] != feats).any(dim=-1)
            with torch.no_grad():
                chosen[changed] = model.model.embed_vision(selection.features[0][changed].to(feats.dtype))
        units.append((chosen, selection.keep[0]))
    return units


def gemma4_items(model, inputs, method="vispruner", num_tokens=4, budget="per_crop", **options) -> dict[str, list]:
    """Per modality, the (tokens, keep) of each unit in reading order."""
    items = {"image": [], "video": []}
    if "pixel_values" in inputs:
        items["image"] = gemma4_units(
            model, inputs["pixel_values"], inputs["image_position_ids"], method, num_tokens, **options
        )
    if "pixel_values_videos" in inputs:
        items["video"] = gemma4_units(
            model, inputs["pixel_values_videos"], inputs["video_position_ids"], method, num_tokens, budget,
            inputs["num_frames_per_video"].tolist(), **options,
        )
    return items


def audio_tokens(model, inputs) -> list[torch.Tensor]:
    """Per clip, the stock audio tower's tokens (its padding dropped)."""
    if "input_features" not in inputs:
        return []
    with torch.no_grad():
        output = model.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    return [tokens[mask] for tokens, mask in zip(output.pooler_output, output.attention_mask)]


def gemma4_rows(model, inputs, items: dict[str, list]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (embeddings, ids) of the unpadded prompt with each placeholder replaced by its
    unit's token where kept and dropped where not, and audio placeholders by the audio tower's
    tokens; ids -1 (image), -2 (video) or -3 (audio) for those."""
    config = model.config
    token_ids = {config.image_token_id: ("image", -1), config.video_token_id: ("video", -2),
                 config.audio_token_id: ("audio", -3)}
    clips = [(tokens, torch.ones(len(tokens), dtype=torch.bool)) for tokens in audio_tokens(model, inputs)]
    units = {**items, "audio": clips}
    queues = {
        name: iter([(token, kept) for tokens, keep in group for token, kept in zip(tokens, keep.tolist())])
        for name, group in units.items()
    }
    embed = model.get_input_embeddings()
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        parts, sources = [], []
        for token_id in ids[mask.bool()].tolist():
            if token_id in token_ids:
                name, source = token_ids[token_id]
                token, kept = next(queues[name])
                if kept:
                    parts.append(token[None])
                    sources.append(source)
            else:
                with torch.no_grad():
                    parts.append(embed(torch.tensor([token_id])))
                sources.append(token_id)
        rows.append((torch.cat(parts), torch.tensor(sources)))
    assert all(next(queue, None) is None for queue in queues.values()), "more units than placeholders"
    return rows


def _placeholders(model, ids: torch.Tensor) -> torch.Tensor:
    config = model.config
    return torch.isin(ids, torch.tensor([config.image_token_id, config.video_token_id, config.audio_token_id]))


def _embed(model, tokens: list[int]) -> torch.Tensor:
    """Embeddings of generated ``tokens``, placeholder ids read as padding."""
    ids = torch.tensor(tokens)
    with torch.no_grad():
        text_ids = ids.masked_fill(_placeholders(model, ids), model.config.text_config.pad_token_id)
        return model.get_input_embeddings()(text_ids)


def lm_logits(model, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(L, V) soft-capped logits of one unpadded row (``ids`` < 0 for visual and audio tokens), no cache."""
    text = model.config.text_config
    length = len(embeds)
    visual = (ids == -1) | (ids == -2)
    block = torch.cumsum(visual & ~torch.cat([torch.tensor([False]), visual[:-1]]), 0)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same_image = visual[:, None] & visual[None, :] & (block[:, None] == block[None, :])
    window = (torch.arange(length)[:, None] - torch.arange(length)[None, :]).abs() < text.sliding_window

    def additive(allowed):
        return torch.zeros(1, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)

    masks = {"full_attention": additive(causal), "sliding_attention": additive((causal | same_image) & window)}
    language = model.model.language_model
    with torch.no_grad():
        per_layer = None
        if text.hidden_size_per_layer_input:
            text_ids = ids.masked_fill((ids < 0) | _placeholders(model, ids), text.pad_token_id)
            per_layer = language.get_per_layer_inputs(text_ids[None], None)
        hidden = language(
            inputs_embeds=embeds[None], per_layer_inputs=per_layer, attention_mask=masks,
            position_ids=torch.arange(length)[None], use_cache=False,
        ).last_hidden_state
        logits = model.lm_head(hidden)[0]
    cap = text.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def greedy(model, embeds: torch.Tensor, ids: torch.Tensor, steps: int) -> list[int]:
    tokens = []
    for _ in range(steps):
        token = int(lm_logits(model, embeds, ids)[-1].argmax())
        tokens.append(token)
        embeds = torch.cat([embeds, _embed(model, [token])])
        ids = torch.cat([ids, torch.tensor([token])])
    return tokens


def continuation_logits(model, embeds: torch.Tensor, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V): the logits that chose each of ``tokens`` after the prompt."""
    logits = lm_logits(model, torch.cat([embeds, _embed(model, tokens)]), torch.cat([ids, torch.tensor(tokens)]))
    return logits[len(embeds) - 1 : len(embeds) - 1 + len(tokens)]
