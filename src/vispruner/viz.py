"""Pictures of what a method kept: the image with pruned patches dimmed and kept patches marked.

Works for any model whose visual tokens form a patch grid: pass the image as the model saw it
(:func:`pixel_values_to_image` undoes a processor's normalisation) and the keep mask of its grid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image

IMPORTANT = (255, 140, 0)  # orange
DIVERSE = (30, 144, 255)  # blue
KEPT = (50, 205, 50)  # green, when a method makes no important/diverse split
DIM = 0.25  # brightness left to pruned patches
MIN_SIDE = 336  # small images are enlarged so that the marks stay legible


def _flat_bool(mask: "torch.Tensor | np.ndarray | Sequence[bool]", name: str) -> list[bool]:
    import numpy as np

    array = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
    if array.dtype != bool:
        raise ValueError(f"{name} must be a boolean mask; got dtype {array.dtype}")
    return [bool(v) for v in array.reshape(-1)]


def _grid_for(tokens: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"grid must be given when the number of patches ({tokens}) is not a square")
        return side, side
    rows, cols = grid
    if rows < 1 or cols < 1 or rows * cols != tokens:
        raise ValueError(f"grid must be (rows, cols) with rows * cols == {tokens} patches; got {grid}")
    return rows, cols


def draw_selection(
    image: "Image.Image",
    keep: "torch.Tensor | np.ndarray | Sequence[bool]",
    important: "torch.Tensor | np.ndarray | Sequence[bool] | None" = None,
    grid: tuple[int, int] | None = None,
    legend: bool = True,
) -> "Image.Image":
    """Return a copy of ``image`` showing which patches were kept.

    Args:
        image: the image as the vision tower saw it (after resizing and cropping).
        keep: (N,) or (rows, cols) bool, True for kept patches, in raster order.
        important: same shape, the attention-chosen subset of ``keep`` (drawn orange; the rest
            of ``keep`` blue); None draws every kept patch green.
        grid: (rows, cols) of the patch grid; default: square.
        legend: add a strip below the image with the counts.

    Pruned patches are dimmed to a quarter of their brightness; kept patches get a coloured frame.
    """
    from PIL import Image, ImageDraw

    kept = _flat_bool(keep, "keep")
    rows, cols = _grid_for(len(kept), grid)
    chosen = _flat_bool(important, "important") if important is not None else None
    if chosen is not None:
        if len(chosen) != len(kept):
            raise ValueError(f"important must have as many entries as keep ({len(kept)}); got {len(chosen)}")
        if any(c and not k for c, k in zip(chosen, kept)):
            raise ValueError("important must be a subset of keep")

    base = image.convert("RGB")
    scale = max(1.0, MIN_SIDE / min(base.size))
    if scale > 1.0:
        base = base.resize((round(base.width * scale), round(base.height * scale)), Image.NEAREST)
    width, height = base.size
    dimmed = Image.eval(base, lambda v: int(v * DIM))
    canvas = base.copy()
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(width / cols, height / rows) / 10))
    for index, is_kept in enumerate(kept):
        row, col = divmod(index, cols)
        box = (
            round(col * width / cols),
            round(row * height / rows),
            round((col + 1) * width / cols),
            round((row + 1) * height / rows),
        )
        if not is_kept:
            canvas.paste(dimmed.crop(box), box[:2])
            continue
        colour = KEPT if chosen is None else (IMPORTANT if chosen[index] else DIVERSE)
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=colour, width=line)

    if not legend:
        return canvas
    strip = 22
    framed = Image.new("RGB", (width, height + strip), (255, 255, 255))
    framed.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(framed)
    total, pruned = len(kept), len(kept) - sum(kept)
    if chosen is None:
        entries = [(KEPT, f"kept {sum(kept)}")]
    else:
        n_important = sum(chosen)
        entries = [(IMPORTANT, f"important {n_important}"), (DIVERSE, f"diverse {sum(kept) - n_important}")]
    entries.append(((64, 64, 64), f"pruned {pruned} of {total}"))
    x = 4
    for colour, text in entries:
        draw.rectangle((x, height + 6, x + 10, height + 16), fill=colour)
        draw.text((x + 14, height + 5), text, fill=(0, 0, 0))
        x += 14 + int(draw.textlength(text)) + 12
    return framed


def pixel_values_to_image(
    pixel_values: "torch.Tensor", mean: Sequence[float], std: Sequence[float]
) -> "Image.Image":
    """(3, H, W) normalised pixel values, as a processor made them, back to a PIL image."""
    import torch
    from PIL import Image

    if pixel_values.ndim != 3 or pixel_values.shape[0] != 3:
        raise ValueError(f"pixel_values must have shape (3, H, W); got {tuple(pixel_values.shape)}")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    pixels = (pixel_values.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    array = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array)
