"""A step-by-step reference for pruned Qwen-VL models, sharing no code with the adapters.

The tower runs once (as in the model); hooks note the last block's input and arguments and the
merger's input. The signal is recomputed eagerly: the whole softmax matrix of each attention
segment, from the block's own norm, qkv projection and rotary embedding (rotate-half written
out here). Each image (or temporal group) is selected by the registered method; the language
model then gets, one row at a time without padding and without a cache, the text embeddings and
the kept merged tokens, with the 3D positions of the UNPRUNED prompt (the model's get_rope_index)
gathered at the kept columns; generated tokens continue from the unpruned prompt's next position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.vision_utils import get_vision_window_index

from vispruner.methods import VisionSignals, get_method

from ..tiny_qwen import IMAGE_ID, VIDEO_ID


@dataclass
class ReferenceItem:
    keep: torch.Tensor  # (pieces, N) bool
    important: torch.Tensor | None
    tokens: torch.Tensor  # (P, D) merged tokens of the unpruned item, placeholder order
    kept_tokens: torch.Tensor  # what the item contributes to the pruned prompt
    deepstack: list[torch.Tensor]  # Qwen3-VL: per deepstack layer, the kept tokens' features


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


def tower_signals(model, pixels, grid_thw):
    """Per merged token in placeholder order: eager attention received (mean over its 4 patches),
    merger-input features (4 patch rows), keys (mean over the 4 patches), merged tokens."""
    visual = model.model.visual
    seen = {}
    block = visual.blocks[-1]
    hooks = [
        block.register_forward_pre_hook(lambda m, a, k: seen.update(block=(a, k)), with_kwargs=True),
        visual.merger.register_forward_pre_hook(lambda m, a: seen.update(merger=a[0])),
    ]
    try:
        with torch.no_grad():
            output = visual(pixels, grid_thw=grid_thw)
            merged = output.pooler_output
            seen["deepstack"] = getattr(output, "deepstack_features", None) or []
    finally:
        for hook in hooks:
            hook.remove()
    args, kwargs = seen["block"]
    hidden = args[0]
    attention = block.attn
    with torch.no_grad():
        qkv = attention.qkv(block.norm1(hidden)).reshape(hidden.shape[0], 3, attention.num_heads, -1)
        cos, sin = kwargs["position_embeddings"]
        query, key = _rotate(qkv[:, 0].double(), cos.double(), sin.double()), _rotate(qkv[:, 1].double(), cos.double(), sin.double())
    bounds = kwargs["cu_seqlens"].tolist()
    received = torch.zeros(hidden.shape[0], dtype=torch.float64)
    for start, end in zip(bounds, bounds[1:]):
        q, k = query[start:end].transpose(0, 1), key[start:end].transpose(0, 1)
        matrix = torch.softmax(q @ k.transpose(1, 2) * attention.scaling, dim=-1)  # (H, n, n)
        received[start:end] = matrix.mean(dim=(0, 1))
    unit = visual.spatial_merge_size**2
    order = torch.arange(hidden.shape[0] // unit)
    if hasattr(visual, "fullatt_block_indexes"):
        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        order = torch.argsort(window_index)
    scores = received.view(-1, unit).mean(dim=1)[order].float()
    features = seen["merger"].reshape(hidden.shape[0] // unit, -1)[order]  # one row per merged token
    keys = key.float().view(-1, unit, *key.shape[1:]).mean(dim=1)[order]
    return scores, features, keys, merged, seen["deepstack"]


def _is_glm(model):
    """GLM-4.1V / 4.5V: a 2 x 2 conv fuses each token's patches before the merger (one merger input
    row per token), and the tower sees each temporal group of a video as an image of its own."""
    return type(model).__name__.startswith("Glm4v")


def reference_items(model, pixels, grid_thw, num_tokens=8, method="vispruner", per_video=False, **options):
    """Per image or video: its keep mask and tokens, each item (temporal group) selected on its own."""
    chosen = get_method(method)
    tower_grid = grid_thw
    if _is_glm(model):
        tower_grid = torch.repeat_interleave(grid_thw, grid_thw[:, 0], dim=0)
        tower_grid[:, 0] = 1
    scores, features, keys, merged, deepstack = tower_signals(model, pixels, tower_grid)
    merge = model.model.visual.spatial_merge_size
    width = features.shape[1] // (1 if _is_glm(model) else merge**2)  # of a row of the merger's input
    items, start = [], 0
    for t, h, w in grid_thw.tolist():
        rows, cols = h // merge, w // merge
        size = rows * cols
        pieces = [(start, t * size, (t * rows, cols))] if per_video else [
            (start + i * size, size, (rows, cols)) for i in range(t)
        ]
        budgets = [num_tokens] if per_video or t == 1 else [max(1, num_tokens // t + (i < num_tokens % t)) for i in range(t)]
        keep, important, replaced = [], [], []
        for (first, count, grid), budget in zip(pieces, budgets):
            part = slice(first, first + count)
            projected = None
            if "projected" in chosen.needs:
                with torch.no_grad():
                    projected = model.model.visual.merger(features[part].reshape(-1, width))
            signals = VisionSignals(features[part][None], scores[part][None], keys[part][None], grid,
                                    None if projected is None else projected[None])
            selection = chosen.select(signals, budget, **options)
            keep.append(selection.keep[0])
            important.append(None if selection.important is None else selection.important[0])
            replaced.append(features[part] if selection.features is None else selection.features[0])
        keep = torch.cat(keep)
        with torch.no_grad():
            new_features = torch.cat(replaced)
            tokens = model.model.visual.merger(new_features.reshape(-1, width))
        items.append(ReferenceItem(
            keep.view(t, size), None if important[0] is None else torch.cat(important).view(t, size),
            merged[start : start + t * size], tokens[keep],
            [layer[start : start + t * size][keep] for layer in deepstack],
        ))
        start += t * size
    return items


def reference_rows(model, inputs, images, videos):
    """Per row: (embeddings, (3, L') positions, the next position, ids of each kept token (-1 visual))."""
    ids_all, mask_all = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        positions, _ = model.model.get_rope_index(
            ids_all, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=mask_all,
        )
    embed = model.get_input_embeddings()
    # Per modality (by its mm_token_type_ids value: GLM's video frames use the image token id), all
    # items' flags, kept tokens and deepstack rows in order, read run by run (a video may be split
    # into one run per temporal group).
    streams = {}
    for kind, items in ((1, images), (2, videos)):
        if items:
            flags = torch.cat([item.keep.flatten() for item in items])
            kept = torch.cat([item.kept_tokens for item in items])
            layers = [torch.cat(layer) for layer in zip(*(item.deepstack for item in items))]
            streams[kind] = [flags, kept, layers, 0]
    rows = []
    for row, (ids, mask, types) in enumerate(zip(ids_all, mask_all, inputs["mm_token_type_ids"])):
        real = mask.bool()
        ids, types, full_positions = ids[real], types[real], positions[:, row, real]
        parts, columns, sources, column, deepstack = [], [], [], 0, []
        while column < len(ids):
            token, kind = int(ids[column]), int(types[column])
            if kind in streams:
                flags, kept, layers, cursor = streams[kind]
                run = int(((ids[column:] == token) & (types[column:] == kind)).long().cumprod(0).sum())
                run_flags = flags[cursor : cursor + run]
                first, count = int(flags[:cursor].sum()), int(run_flags.sum())
                parts.append(kept[first : first + count])
                deepstack.append([layer[first : first + count] for layer in layers])
                columns += [column + i for i in range(run) if run_flags[i]]
                sources += [-1] * count
                streams[kind][3] = cursor + run
                column += run
            else:
                with torch.no_grad():
                    parts.append(embed(ids[column : column + 1]))
                columns.append(column)
                sources.append(token)
                column += 1
        # generate() continues from the last column + 1. (Stock Qwen2.5-VL's rope_deltas, used without
        # position_ids, continue from the largest position + 1: the two differ after a video whose
        # temporal positions run past the text; the reference follows generate().)
        layers = [torch.cat(per_layer) for per_layer in zip(*deepstack)]
        rows.append(Row(torch.cat(parts), full_positions[:, columns], int(full_positions[:, -1].max()) + 1,
                        torch.tensor(sources), layers))
    return rows


@dataclass
class Row:
    embeds: torch.Tensor  # (L', D) text embeddings and kept visual tokens, no padding
    positions: torch.Tensor  # (3, L') the unpruned prompt's positions at the kept columns
    next_position: int
    sources: torch.Tensor  # (L',) input id of each token, -1 for a visual token
    deepstack: list[torch.Tensor]  # Qwen3-VL: per deepstack layer, (visual tokens, D)


def lm_logits(model, row, tokens=()):
    """Logits of ``row``'s prompt followed by ``tokens``, positions continuing from the unpruned prompt."""
    embeds, positions = row.embeds, row.positions
    extra = {}
    with torch.no_grad():
        if tokens:
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor(list(tokens)))])
            steps = torch.arange(row.next_position, row.next_position + len(tokens)).expand(3, -1)
            positions = torch.cat([positions, steps], dim=1)
        if row.deepstack:
            visual = torch.cat([row.sources == -1, torch.zeros(len(tokens), dtype=torch.bool)])
            extra = {"visual_pos_masks": visual[None], "deepstack_visual_embeds": row.deepstack}
        hidden = model.model.language_model(
            inputs_embeds=embeds[None], position_ids=positions[:, None], use_cache=False, **extra
        ).last_hidden_state
        return model.lm_head(hidden)[0]


def greedy(model, row, steps):
    tokens = []
    for _ in range(steps):
        tokens.append(int(lm_logits(model, row, tokens)[-1].argmax()))
    return tokens


def continuation_logits(model, row, tokens):
    length = len(row.embeds)
    return lm_logits(model, row, tokens)[length - 1 : length - 1 + len(tokens)]


def reference_loss(model, rows, inputs, labels):
    total, count = 0.0, 0
    for row, ids, row_labels, mask in zip(rows, inputs["input_ids"], labels, inputs["attention_mask"]):
        sources = row.sources
        ids, row_labels = ids[mask.bool()], row_labels[mask.bool()]
        text = iter(row_labels[(ids != IMAGE_ID) & (ids != VIDEO_ID)].tolist())
        targets = torch.tensor([next(text) if s >= 0 else -100 for s in sources.tolist()])[1:]
        logits = lm_logits(model, row)[:-1]
        total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    return total / count


def fastv_greedy(model, row, layer, num_tokens, steps):
    """Greedy tokens of FastV run by hand on one unpadded row (images only: each placeholder run
    is one image, one group): decoder layers one by one, no cache, the last prompt token's
    attention in layer ``layer - 1`` from the full matrix, the image tokens it attends to least
    dropped from layer ``layer`` on, every kept token at its 3D position."""
    language_model = model.model.language_model
    visual = row.sources == -1
    starts = torch.cat([visual[:1], visual[1:] & ~visual[:-1]])
    groups = torch.where(visual, starts.long().cumsum(0) - 1, -1)
    tokens: list[int] = []
    for _ in range(steps):
        embeds, positions = row.embeds, row.positions
        with torch.no_grad():
            if tokens:
                embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor(tokens))])
                steps_at = torch.arange(row.next_position, row.next_position + len(tokens)).expand(3, -1)
                positions = torch.cat([positions, steps_at], dim=1)
            hidden, prompt = embeds[None], len(row.embeds)
            keep = torch.ones(len(embeds), dtype=torch.bool)
            for index, block in enumerate(language_model.layers):
                if index == layer:
                    hidden, positions = hidden[:, keep], positions[:, keep]
                cos, sin = language_model.rotary_emb(hidden, positions[:, None])
                length = hidden.shape[1]
                causal = torch.full((length, length), torch.finfo(hidden.dtype).min).triu(1)[None, None]
                if index == layer - 1:
                    attention = block.self_attn
                    normed = block.input_layernorm(hidden)
                    shape = (1, length, -1, attention.head_dim)
                    query, key = attention.q_proj(normed).view(shape), attention.k_proj(normed).view(shape)
                    if hasattr(attention, "q_norm"):
                        query, key = attention.q_norm(query), attention.k_norm(key)
                    rotate = __import__(type(attention).__module__, fromlist=["x"]).apply_rotary_pos_emb
                    query, key = rotate(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
                    key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
                    scores = (query @ key.transpose(-1, -2) * attention.scaling + causal).softmax(-1)
                    row_scores = scores[0, :, prompt - 1].mean(0)
                    for group in range(int(groups.max()) + 1):
                        members = [i for i in range(prompt) if groups[i] == group]
                        ranked = sorted(members, key=lambda i: (-float(row_scores[i]), i))
                        keep[ranked[num_tokens:]] = False
                hidden = block(hidden, attention_mask=causal, position_embeddings=(cos, sin), position_ids=None)
                if index < len(row.deepstack):
                    assert index < layer, "the reference adds deepstack features before the cut only"
                    hidden[0, torch.cat([visual, torch.zeros(len(tokens), dtype=torch.bool)])] += row.deepstack[index]
            logits = model.lm_head(language_model.norm(hidden))[0]
        tokens.append(int(logits[-1].argmax()))
    return tokens
