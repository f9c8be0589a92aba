"""A step-by-step reference for pruned LLaVA and LLaVA-NeXT, sharing no code with the adapters.

It computes the vision features with ``output_hidden_states``, the [CLS] attention from an eager
copy of the model with ``output_attentions``, the keys by running the layer's own norm and key
projection, calls the registered method on them, lays out LLaVA-NeXT's anyres tokens by hand
(base image, unpadded grid, a newline per row), and runs the language model on one unpadded
sequence at a time, without a cache, decoding greedily by re-running the whole sequence.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import LlavaNextForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from vispruner.methods import VisionSignals, get_method


@dataclass
class ReferenceImage:
    keep: torch.Tensor  # (crops, N) bool
    important: torch.Tensor | None
    tokens: torch.Tensor  # (kept tokens, D): what the image contributes to the prompt, in order
    offsets: torch.Tensor  # (kept tokens,) long: each one's place among the image's unpruned tokens


def _crops(model, pixel_values: torch.Tensor, image_sizes) -> list[torch.Tensor]:
    """Pixel values of each image's crops, (crops, 3, H, W), base image first."""
    if not isinstance(model, LlavaNextForConditionalGeneration):
        return [image.unsqueeze(0) for image in pixel_values]
    side = model.config.vision_config.image_size
    crops = []
    for image, (height, width) in zip(pixel_values, image_sizes.tolist()):
        best_h, best_w = select_best_resolution((height, width), model.config.image_grid_pinpoints)
        crops.append(image[: 1 + (best_h // side) * (best_w // side)])
    return crops


def vision_signals(model, crops: torch.Tensor, need_keys: bool):
    """features (c, N, C), head-averaged [CLS] attention (c, N) and keys (c, N, H, d) of the feature layer."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    count = len(tower.encoder.layers)
    hidden_index = layer if layer >= 0 else count + 1 + layer
    with torch.no_grad():
        states = tower(crops, output_hidden_states=True).hidden_states
        eager = copy.deepcopy(tower)
        eager.set_attn_implementation("eager")
        attentions = eager(crops, output_attentions=True).attentions
        keys = None
        if need_keys:
            block = tower.encoder.layers[hidden_index - 1]
            keys = block.self_attn.k_proj(block.layer_norm1(states[hidden_index - 1]))[:, 1:]
            keys = keys.unflatten(-1, (block.self_attn.num_heads, block.self_attn.head_dim))
    features = states[hidden_index][:, 1:]
    attention = attentions[hidden_index - 1][:, :, 0, 1:].mean(dim=1)
    return features, attention, keys


def _layout(model, crops: int, image_size) -> list[tuple[int, int] | None]:
    """LLaVA-NeXT token order of one image: (crop, patch) per token, None for a newline."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tokens: list[tuple[int, int] | None] = [(0, p) for p in range(side * side)]
    if crops == 1:
        return tokens + [None]
    height, width = image_size
    best_h, best_w = select_best_resolution((height, width), model.config.image_grid_pinpoints)
    crop_px = model.config.vision_config.image_size
    grid_rows, grid_cols = best_h // crop_px, best_w // crop_px
    rows, cols = grid_rows * side, grid_cols * side
    # Unpadding: the resized image is centred in the (rows x cols) grid; drop the padded bands.
    row_range, col_range = range(rows), range(cols)
    if width / height > cols / rows:
        kept = int(round(height * (cols / width), 7))
        pad = (rows - kept) // 2
        row_range = range(pad, rows - pad)
    else:
        kept = int(round(width * (rows / height), 7))
        pad = (cols - kept) // 2
        col_range = range(pad, cols - pad)
    for r in row_range:
        for c in col_range:
            crop = 1 + (r // side) * grid_cols + c // side
            tokens.append((crop, (r % side) * side + c % side))
        tokens.append(None)
    return tokens


def image_layouts(model, inputs) -> list[list[tuple[int, int] | None]]:
    """Per image of ``inputs``, (crop, patch) of each of its placeholder tokens in prompt order,
    None for a newline."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    layouts = []
    for index, crops in enumerate(_crops(model, inputs["pixel_values"], inputs.get("image_sizes"))):
        if isinstance(model, LlavaNextForConditionalGeneration):
            layouts.append(_layout(model, len(crops), inputs["image_sizes"][index].tolist()))
        else:
            layouts.append([(0, p) for p in range(side * side)])
    return layouts


def reference_images(
    model,
    pixel_values: torch.Tensor,
    image_sizes=None,
    num_tokens: int = 64,
    method: str = "vispruner",
    budget: str = "per_crop",
    **options,
) -> list[ReferenceImage]:
    """Per image: the crop keep masks and the kept token embeddings, computed step by step.

    The tower runs once on all crops, as in the model (CPU kernels may round differently for
    another batch size). Per crop, the method runs once on all crops, so that a method drawing
    random numbers draws them as in the model; per image, once per image.
    """
    chosen = get_method(method)
    crops = _crops(model, pixel_values, image_sizes)
    counts = [len(c) for c in crops]
    features, attention, keys = vision_signals(model, torch.cat(crops), "keys" in chosen.needs)
    patches = features.shape[1]
    side = int(patches**0.5)
    tokens = None
    if "projected" in chosen.needs:
        with torch.no_grad():
            tokens = model.model.multi_modal_projector(features)
    if budget == "per_image":
        selections = []
        for f, a, k, t in zip(
            features.split(counts), attention.split(counts), _split(keys, counts), _split(tokens, counts)
        ):
            signals = VisionSignals(
                f.reshape(1, -1, f.shape[-1]),
                a.reshape(1, -1),
                None if k is None else k.reshape(1, -1, *k.shape[2:]),
                (len(f) * side, side),
                None if t is None else t.reshape(1, -1, t.shape[-1]),
            )
            selections.append(chosen.select(signals, num_tokens, **options))
        keep = torch.cat([s.keep.reshape(-1, patches) for s in selections])
        important = None if selections[0].important is None else torch.cat(
            [s.important.reshape(-1, patches) for s in selections]
        )
        replaced = [s.features for s in selections]
        replaced = None if replaced[0] is None else torch.cat([r.reshape(-1, patches, r.shape[-1]) for r in replaced])
    else:
        selection = chosen.select(VisionSignals(features, attention, keys, (side, side), tokens), num_tokens, **options)
        keep, important, replaced = selection.keep, selection.important, selection.features
    with torch.no_grad():
        projected = model.model.multi_modal_projector(features if replaced is None else replaced)
    images = []
    for index, (crop_keep, crop_important, crop_features) in enumerate(
        zip(keep.split(counts), _split(important, counts), projected.split(counts))
    ):
        if isinstance(model, LlavaNextForConditionalGeneration):
            order = _layout(model, len(crop_keep), image_sizes[index].tolist())
            newline = model.model.image_newline
            places = [place for place, item in enumerate(order) if item is None or crop_keep[item]]
            tokens = torch.stack([newline if order[p] is None else crop_features[order[p]] for p in places])
            offsets = torch.tensor(places)
        else:
            tokens = crop_features[0][crop_keep[0]]
            offsets = crop_keep[0].nonzero().flatten()
        images.append(ReferenceImage(crop_keep, crop_important, tokens, offsets))
    return images


def _split(values: torch.Tensor | None, counts: list[int]) -> list[torch.Tensor | None]:
    return [None] * len(counts) if values is None else list(values.split(counts))


def reference_sequences(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: list[ReferenceImage]):
    """Per row: the embeddings the language model should see (padding dropped), and for each of
    them the input id it stands for (-1 for an image token), so labels can be laid out."""
    image_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    queue = iter(images)
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()]
        parts, sources, position = [], [], 0
        while position < len(ids):
            if ids[position] == image_id:
                image = next(queue)
                full = (ids[position:] == image_id).long().cumprod(0).sum()
                parts.append(image.tokens)
                sources += [-1] * len(image.tokens)
                position += int(full)
            else:
                with torch.no_grad():
                    parts.append(embed(ids[position : position + 1]))
                sources.append(int(ids[position]))
                position += 1
        rows.append((torch.cat(parts), torch.tensor(sources)))
    return rows


def reference_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: list[ReferenceImage]):
    """Per row, (kept tokens,) long: the position each token of :func:`reference_sequences` has in
    the unpruned, unpadded prompt (0, 1, 2, ... over text and every image token), and the length
    of that prompt, after which decoding continues."""
    image_id = model.config.image_token_id
    queue = iter(images)
    rows = []
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()]
        positions, position = [], 0
        while position < len(ids):
            if ids[position] == image_id:
                full = int((ids[position:] == image_id).long().cumprod(0).sum())
                positions += (position + next(queue).offsets).tolist()
                position += full
            else:
                positions.append(position)
                position += 1
        rows.append((torch.tensor(positions), len(ids)))
    return rows


def lm_logits(model, embeds: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """(L, V) logits of one unpadded sequence of embeddings, no cache, positions 0..L-1 or ``positions``.

    The all-ones mask is passed on purpose: without one, transformers reads gapped positions as
    packed sequences."""
    length = len(embeds)
    positions = torch.arange(length) if positions is None else positions
    with torch.no_grad():
        hidden = model.get_decoder()(
            inputs_embeds=embeds.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            attention_mask=torch.ones(1, length, dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden)[0]


def _continued(positions: torch.Tensor | None, after: int | None, count: int) -> torch.Tensor | None:
    """Positions of the prompt followed by ``count`` generated tokens numbered from ``after``."""
    if positions is None:
        return None
    return torch.cat([positions, torch.arange(after, after + count)])


def greedy(model, embeds: torch.Tensor, steps: int, positions: torch.Tensor | None = None, after: int | None = None):
    """Greedy tokens; with ``positions`` (the prompt's), the generated ones are numbered from ``after``."""
    tokens = []
    embed = model.get_input_embeddings()
    prompt = embeds
    for _ in range(steps):
        token = int(lm_logits(model, prompt, _continued(positions, after, len(tokens)))[-1].argmax())
        tokens.append(token)
        with torch.no_grad():
            prompt = torch.cat([prompt, embed(torch.tensor([token]))])
    return tokens


def continuation_logits(
    model, embeds: torch.Tensor, tokens: list[int], positions: torch.Tensor | None = None, after: int | None = None
) -> torch.Tensor:
    """(len(tokens), V): the logits that chose each of ``tokens`` after the prompt ``embeds``."""
    with torch.no_grad():
        extra = model.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long))
    logits = lm_logits(model, torch.cat([embeds, extra]), _continued(positions, after, len(tokens)))
    return logits[len(embeds) - 1 : len(embeds) - 1 + len(tokens)]


def reference_loss(model, rows, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """Mean next-token cross-entropy over all rows; image tokens must be labelled -100."""
    image_id = model.config.image_token_id
    total, count = 0.0, 0
    for (embeds, sources), ids, row_labels, mask in zip(rows, input_ids, labels, attention_mask):
        ids, row_labels = ids[mask.bool()], row_labels[mask.bool()]
        text_labels = iter(row_labels[ids != image_id].tolist())
        targets = torch.tensor([next(text_labels) if source >= 0 else -100 for source in sources.tolist()])[1:]
        logits = lm_logits(model, embeds)[:-1]
        total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    return total / count
