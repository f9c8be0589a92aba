"""Where each image's tokens stand in the prompt vLLM builds, known from the image size alone.

vLLM fixes a prompt's length when the request arrives, before any vision tower runs, so the
number of tokens pruning keeps must follow from the image size. For LLaVA-1.5 it does: K of the
N patches. For LLaVA-NeXT the unpadding that follows the crops would drop, from a selection made
over whole crops, the kept patches that fall on the letterbox padding, a number known only after
the method ran. The plugin therefore chooses among the patches unpadding keeps: each crop's
budget is spent on its part of the image (a rectangle of its patch grid), and the kept count is
known in advance. Where an image fills its crops (no padding), this is exactly the library's
selection (:func:`vispruner.apply`); where it does not, the library spends part of a crop's budget
on padding that is then thrown away, and the plugin does not. LLaVA-OneVision packs (unpads,
shrinks) or pools its tokens before the selection, as the library does, so its count is known.

A :class:`Layout` lists, per image, the pieces the selection sees (their patch indices in the
tower's output and their grids) and the packed order of its tokens in the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters.budget import ratio_tokens
from ..adapters.vision_stage import Item, Settings

#: A packed slot holding LLaVA-NeXT's newline embedding rather than a patch.
NEWLINE = -1


@dataclass(frozen=True)
class Layout:
    """One image as the plugin prunes it.

    Attributes:
        crops: tower inputs (crops) of the image.
        patches: (S,) indices into the image's flattened (crops * N) patch features of the patches
            the selection chooses among, piece by piece, each piece in raster order (LLaVA-OneVision:
            into its packed or pooled tokens, which the selection chooses among).
        shapes: (rows, cols) of each piece's grid of candidate patches.
        packed: (P,) the image's prompt tokens unpruned, in order: an index into ``patches``,
            or :data:`NEWLINE`.
        weights: crops each piece stands for in a per-crop budget (LLaVA-OneVision's packed grid
            stands for all its crops); None: one each.
    """

    crops: int
    patches: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    packed: torch.Tensor
    weights: tuple[int, ...] | None = None

    def item(self) -> Item:
        """The image as :func:`~vispruner.adapters.vision_stage.select_tokens` takes it."""
        return Item(len(self.shapes), self.shapes[0], shapes=self.shapes, crops=self.weights)

    def kept_count(self, settings: Settings) -> int:
        """Prompt tokens of this image after pruning: the kept patches plus every newline."""
        sizes = [rows * cols for rows, cols in self.shapes]
        if settings.budget == "per_image":
            kept = min(settings.tokens_for(sum(sizes)), sum(sizes))
        elif settings.keep_ratio is not None:
            kept = sum(min(ratio_tokens(settings.keep_ratio, size), size) for size in sizes)
        else:
            weights = self.weights or (1,) * len(sizes)
            kept = sum(min(settings.num_tokens * weight, size) for size, weight in zip(sizes, weights))
        return kept + int((self.packed == NEWLINE).sum())

    def packed_keep(self, keep: torch.Tensor) -> torch.Tensor:
        """(S,) keep flags over ``patches`` -> (P',) the kept prompt slots (indices into
        ``patches``, or :data:`NEWLINE`) in prompt order."""
        slots = self.packed.to(keep.device)
        wanted = (slots == NEWLINE) | keep[slots.clamp(min=0)]
        return slots[wanted]


def llava_layout(side: int) -> Layout:
    """LLaVA-1.5: one crop of ``side`` x ``side`` patches in raster order."""
    every = torch.arange(side * side)
    return Layout(1, every, ((side, side),), every)


def llava_next_layout(image_size: tuple[int, int], side: int, crop_pixels: int, pinpoints: list) -> Layout:
    """LLaVA-NeXT (``spatial_unpad``, as vLLM and transformers pack it): the base crop, then the
    high-resolution crops arranged in their grid, unpadded, one newline after each row.

    ``image_size``: the original (height, width); ``side``: patches per crop side;
    ``crop_pixels``: the tower's input size; ``pinpoints``: ``config.image_grid_pinpoints``.
    """
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    per_crop = side * side
    grid_rows, grid_cols = get_anyres_image_grid_shape(tuple(image_size), pinpoints, crop_pixels)
    # Patch indices of the high-resolution crops (after the base crop) laid out as one canvas.
    canvas = torch.arange(per_crop, per_crop * (1 + grid_rows * grid_cols)).view(grid_rows, grid_cols, side, side)
    canvas = unpad_image(canvas.permute(0, 2, 1, 3).reshape(1, grid_rows * side, grid_cols * side), list(image_size))[0]
    patches, shapes = [torch.arange(per_crop)], [(side, side)]
    for crop in range(1, 1 + grid_rows * grid_cols):
        inside = canvas[(canvas // per_crop) == crop]
        if inside.numel() == 0:
            continue
        local = inside - crop * per_crop
        shapes.append((int(local.div(side, rounding_mode="floor").unique().numel()), int((local % side).unique().numel())))
        patches.append(inside.sort().values)
    patches_flat = torch.cat(patches)
    position = torch.full((per_crop * (1 + grid_rows * grid_cols),), NEWLINE, dtype=torch.long)
    position[patches_flat] = torch.arange(patches_flat.numel())
    rows = torch.cat([position[canvas], torch.full((canvas.shape[0], 1), NEWLINE)], dim=1).flatten()
    packed = torch.cat([torch.arange(per_crop), rows])
    return Layout(1 + grid_rows * grid_cols, patches_flat, tuple(shapes), packed)


def onevision_layout(image_size: tuple[int, int], side: int, crop_pixels: int, pinpoints: list, max_crops: int) -> Layout:
    """LLaVA-OneVision (``anyres_max_<max_crops>``, as vLLM and transformers pack it): the base crop,
    then the high-resolution crops' canvas unpadded and, when it holds more than about
    ``max_crops`` crops' worth of patches, shrunk (bilinear), one newline after each row.

    The selection chooses among the packed tokens (the pieces: the base crop, then the packed
    grid, standing for all the high-resolution crops in a per-crop budget), so ``patches``
    indexes the image's packed tokens, newlines aside. Arguments as :func:`llava_next_layout`'s.
    """
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    grid_rows, grid_cols = get_anyres_image_grid_shape(tuple(image_size), pinpoints, crop_pixels)
    _, rows, cols = unpad_image(torch.zeros(1, grid_rows * side, grid_cols * side), list(image_size)).shape
    ratio = math.sqrt(rows * cols / (max_crops * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return onevision_grid_layout(side, rows, cols, grid_rows * grid_cols)


def onevision_grid_layout(side: int, rows: int, cols: int, crops: int) -> Layout:
    """A LLaVA-OneVision image whose ``crops`` high-resolution crops pack into ``rows`` x ``cols`` tokens."""
    per_crop = side * side
    grid = torch.arange(per_crop, per_crop + rows * cols).view(rows, cols)
    packed = torch.cat([torch.arange(per_crop), torch.cat([grid, torch.full((rows, 1), NEWLINE)], dim=1).flatten()])
    return Layout(1 + crops, torch.arange(per_crop + rows * cols), ((side, side), (rows, cols)), packed, (1, crops))


def video_layout(frames: int, side: int) -> Layout:
    """LLaVA-OneVision video: each frame's ``side`` x ``side`` patches pooled (bilinear, as
    ``apply_pooling``) to half the side rounded up, frame by frame, then one newline."""
    pooled = -(-side // 2)
    every = torch.arange(frames * pooled * pooled)
    return Layout(frames, every, ((pooled, pooled),) * frames, torch.cat([every, torch.tensor([NEWLINE])]))
