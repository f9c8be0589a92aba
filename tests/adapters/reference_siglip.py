"""A step-by-step reference for pruned Gemma 3 and LLaVA-OneVision, sharing no code with the adapters.

The tower's features come from ``output_hidden_states``; the attention each patch receives from
an eager copy of the tower with ``output_attentions`` (mean over heads and over its crop's
queries); the keys from the layer's own norm and key projection. Pooling and packing are written
out by hand: Gemma 3's 4 x 4 window means, OneVision's anyres layout (unpadded, downsampled
bilinearly when over 9 crops' worth, a newline per row) and its video frames interpolated to half
size. The registered method runs on those; the kept tokens are taken from the unpatched model's
own features (merged ones projected by hand), laid into each prompt, and the language model runs
on one unpadded row at a time without a cache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Gemma3ForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from vispruner.methods import VisionSignals, get_method


@dataclass
class Piece:
    """Tokens chosen among with one budget: their signals and where they sit in the item's tokens."""

    features: torch.Tensor  # (n, C)
    scores: torch.Tensor  # (n,)
    keys: torch.Tensor  # (n, H, d)
    positions: list[int]
    grid: tuple[int, int]
    crops: int = 1


def tower_signals(model, pixels: torch.Tensor, layer: int, normed: bool = False):
    """features (n, N, C), received attention (n, N) and keys (n, N, H, d) at hidden state ``layer``
    (``normed``: the tower's post-layernormed last hidden state, as Gemma 3 uses)."""
    tower = model.model.vision_tower
    count = model.config.vision_config.num_hidden_layers
    index = layer if layer >= 0 else count + 1 + layer
    with torch.no_grad():
        states = tower(pixels, output_hidden_states=True)
        eager = copy.deepcopy(tower)
        eager.set_attn_implementation("eager")
        attention = eager(pixels, output_attentions=True).attentions[index - 1]
        block = tower.encoder.layers[index - 1]
        keys = block.self_attn.k_proj(block.layer_norm1(states.hidden_states[index - 1]))
    features = states.last_hidden_state if normed else states.hidden_states[index]
    heads = block.self_attn.num_heads
    return features, attention.mean(dim=(1, 2)), keys.unflatten(-1, (heads, keys.shape[-1] // heads))


def _choose(pieces: list[Piece], method: str, num_tokens: int, budget: str, projected: list[torch.Tensor], **options):
    """Per piece: (n,) keep and (n, C) merged features (or None); ``budget="per_image"`` joins them."""
    chosen = get_method(method)
    if budget == "per_image" and len(pieces) > 1:
        widths = {p.grid[1] for p in pieces}
        grid = (sum(p.grid[0] for p in pieces), pieces[0].grid[1]) if len(widths) == 1 else None
        joined = Piece(
            torch.cat([p.features for p in pieces]),
            torch.cat([p.scores for p in pieces]),
            torch.cat([p.keys for p in pieces]),
            [i for p in pieces for i in p.positions],
            grid,
        )
        results, _ = _choose([joined], method, num_tokens, "per_crop", [torch.cat(projected)], **options)
        return results, [joined]
    results = []
    for piece, tokens in zip(pieces, projected):
        budget_here = num_tokens * (piece.crops if budget == "per_crop" else 1)
        signals = VisionSignals(
            piece.features[None], piece.scores[None], piece.keys[None], piece.grid, tokens[None]
        )
        selection = chosen.select(signals, budget_here, **options)
        results.append((selection.keep[0], None if selection.features is None else selection.features[0]))
    return results, pieces


def _kept_tokens(model, tokens: torch.Tensor, pieces, results, project) -> torch.Tensor:
    """The item's tokens (P, D) with the unkept patch tokens dropped and merged ones re-projected."""
    tokens = tokens.clone()
    keep = torch.ones(len(tokens), dtype=torch.bool)
    for piece, (piece_keep, merged) in zip(pieces, results):
        index = torch.tensor(piece.positions)
        keep[index] = piece_keep
        if merged is not None:
            changed = piece_keep & (merged != piece.features).any(dim=-1)
            with torch.no_grad():
                tokens[index[changed]] = project(merged[changed])
    return tokens[keep]


# -- Gemma 3 -----------------------------------------------------------------------------------


def gemma_images(model, pixel_values, method="vispruner", num_tokens=4, budget="per_crop", **options):
    """Per image: the (kept tokens, D) it contributes to the prompt."""
    features, scores, keys = tower_signals(model, pixel_values, -1, normed=True)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    out_side = int(model.config.mm_tokens_per_image**0.5)
    window = side // out_side

    def pool(values):  # (n, side*side, ...) -> (n, out_side**2, ...): each window's mean
        shape = values.shape
        grid = values.reshape(shape[0], out_side, window, out_side, window, *shape[2:])
        return grid.mean(dim=(2, 4)).reshape(shape[0], out_side * out_side, *shape[2:])

    projector = model.model.multi_modal_projector
    with torch.no_grad():
        stock = model.model.get_image_features(pixel_values).pooler_output

    def project(merged):
        return torch.matmul(projector.mm_soft_emb_norm(merged), projector.mm_input_projection_weight)

    images = []
    for f, s, k, tokens in zip(pool(features), pool(scores), pool(keys), stock):
        pieces = [Piece(f, s, k, list(range(len(f))), (out_side, out_side))]
        results, pieces = _choose(pieces, method, num_tokens, budget, [tokens], **options)
        images.append(_kept_tokens(model, tokens, pieces, results, project))
    return images


# -- LLaVA-OneVision ---------------------------------------------------------------------------


def _unpadded_grid(model, crops_hw: tuple[int, int], image_size) -> tuple[slice, slice, int, int]:
    """Rows and columns of the (rows x cols) patch grid that unpadding keeps."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    rows, cols = crops_hw[0] * side, crops_hw[1] * side
    height, width = image_size
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        return slice(pad, rows - pad), slice(0, cols), rows, cols
    kept = int(round(width * (rows / height), 7))
    pad = (cols - kept) // 2
    return slice(0, rows), slice(pad, cols - pad), rows, cols


def onevision_images(
    model, pixel_values, image_sizes, batch_num_images, method="vispruner", num_tokens=4, budget="per_crop", **options
):
    """Per image: the (kept tokens, D) it contributes to the prompt (newlines included)."""
    config = model.config
    crop_px = config.vision_config.image_size
    side = crop_px // config.vision_config.patch_size
    singles = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
    crop_pixels, layouts = [], []
    for image, size, single in zip(pixel_values, image_sizes.tolist(), singles):
        if not single:
            crop_pixels.append(image[:1])
            layouts.append(None)
            continue
        best_h, best_w = select_best_resolution(size, config.image_grid_pinpoints)
        grid_hw = (best_h // crop_px, best_w // crop_px)
        crop_pixels.append(image[: 1 + grid_hw[0] * grid_hw[1]])
        layouts.append(grid_hw)
    counts = [len(c) for c in crop_pixels]
    features, scores, keys = tower_signals(model, torch.cat(crop_pixels), config.vision_feature_layer)
    channels = torch.cat([features, keys.flatten(2), scores.unsqueeze(-1)], dim=-1)
    width, key_width = features.shape[-1], keys.shape[-2:]
    with torch.no_grad():
        stock = model.model.get_image_features(
            pixel_values, image_sizes, batch_num_images=batch_num_images
        ).pooler_output

    def split(rows):
        return rows[:, :width], rows[:, -1], rows[:, width:-1].unflatten(-1, key_width)

    images = []
    for crop_channels, grid_hw, size, tokens in zip(channels.split(counts), layouts, image_sizes.tolist(), stock):
        base = Piece(*split(crop_channels[0]), list(range(side * side)), (side, side))
        pieces = [base]
        if grid_hw is not None:
            # Crops laid out as one (rows x cols) grid, unpadded, then shrunk past ~9 crops' worth.
            grid = crop_channels[1:].view(grid_hw[0], grid_hw[1], side, side, -1).permute(0, 2, 1, 3, 4)
            grid = grid.reshape(grid_hw[0] * side, grid_hw[1] * side, -1)
            row_range, col_range, _, _ = _unpadded_grid(model, grid_hw, size)
            grid = grid[row_range, col_range]
            ratio = math.sqrt(grid.shape[0] * grid.shape[1] / (9 * side**2))
            if ratio > 1.1:
                target = [int(grid.shape[0] // ratio), int(grid.shape[1] // ratio)]
                grid = F.interpolate(grid.permute(2, 0, 1)[None], target, mode="bilinear")[0].permute(1, 2, 0)
            rows, cols = grid.shape[:2]
            # Row r's tokens sit after the base and r earlier rows of (cols + 1 newline).
            positions = [side * side + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
            pieces.append(Piece(*split(grid.reshape(rows * cols, -1)), positions, (rows, cols), grid_hw[0] * grid_hw[1]))
        projected = [tokens[piece.positions] for piece in pieces]
        results, pieces = _choose(pieces, method, num_tokens, budget, projected, **options)
        images.append(_kept_tokens(model, tokens, pieces, results, model.model.multi_modal_projector))
    return images


def onevision_videos(model, pixel_values_videos, method="vispruner", num_tokens=4, budget="per_crop", **options):
    """Per video: the (kept tokens, D) it contributes to the prompt (its final newline included)."""
    videos, frames = pixel_values_videos.shape[:2]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    pooled = math.ceil(side / 2)
    features, scores, keys = tower_signals(model, pixel_values_videos.flatten(0, 1), model.config.vision_feature_layer)
    channels = torch.cat([features, keys.flatten(2), scores.unsqueeze(-1)], dim=-1)
    grid = channels.view(videos * frames, side, side, -1).permute(0, 3, 1, 2)
    small = F.interpolate(grid, size=[pooled, pooled], mode="bilinear").permute(0, 2, 3, 1)
    small = small.reshape(videos, frames, pooled * pooled, -1)
    width, key_width = features.shape[-1], keys.shape[-2:]
    with torch.no_grad():
        stock = model.model.get_video_features(pixel_values_videos).pooler_output
    result = []
    for video, tokens in zip(small, stock):
        pieces = []
        for frame, rows in enumerate(video):
            positions = list(range(frame * pooled * pooled, (frame + 1) * pooled * pooled))
            pieces.append(
                Piece(rows[:, :width], rows[:, -1], rows[:, width:-1].unflatten(-1, key_width), positions, (pooled, pooled))
            )
        projected = [tokens[piece.positions] for piece in pieces]
        results, pieces = _choose(pieces, method, num_tokens, budget, projected, **options)
        result.append(_kept_tokens(model, tokens, pieces, results, model.model.multi_modal_projector))
    return result


# -- the language model ------------------------------------------------------------------------


def sequences(model, input_ids, attention_mask, items: dict[int, list[torch.Tensor]]):
    """Per row: (embeddings, token types) of the unpadded prompt with each placeholder run replaced
    by its item's kept tokens; ``items`` maps a placeholder id to its items in reading order."""
    embed = model.get_input_embeddings()
    queues = {token: iter(values) for token, values in items.items()}
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()]
        parts, types, position = [], [], 0
        while position < len(ids):
            token = int(ids[position])
            if token in queues:
                run = int((ids[position:] == token).long().cumprod(0).sum())
                kept = next(queues[token])
                parts.append(kept)
                types += [1] * len(kept)
                position += run
            else:
                with torch.no_grad():
                    parts.append(embed(ids[position : position + 1]))
                types.append(0)
                position += 1
        rows.append((torch.cat(parts), torch.tensor(types)))
    return rows


def lm_logits(model, embeds: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    """(L, V) logits of one unpadded sequence, no cache; Gemma 3 gets its bidirectional image mask."""
    with torch.no_grad():
        if isinstance(model, Gemma3ForConditionalGeneration):
            hidden = model.model(inputs_embeds=embeds[None], token_type_ids=types[None], use_cache=False)
        else:
            hidden = model.model.language_model(inputs_embeds=embeds[None], use_cache=False)
        return model.lm_head(hidden.last_hidden_state)[0]


def greedy(model, embeds: torch.Tensor, types: torch.Tensor, steps: int) -> list[int]:
    tokens = []
    embed = model.get_input_embeddings()
    for _ in range(steps):
        token = int(lm_logits(model, embeds, types)[-1].argmax())
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed(torch.tensor([token]))])
        types = torch.cat([types, types.new_zeros(1)])
    return tokens
