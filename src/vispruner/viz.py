"""Pictures of what a method kept: the image with pruned patches veiled and kept patches framed.

Works for any model whose visual tokens form a patch grid. The grid covers the image as the
vision tower saw it, after the processor's resize and centre crop: pass that image
(:func:`pixel_values_to_image` undoes a processor's normalisation), or the original image and the
processor (:func:`image_as_seen` resizes and crops it the same way), with the keep mask of the grid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image, ImageFont

IMPORTANT = (255, 140, 0)  # orange
DIVERSE = (30, 144, 255)  # blue
KEPT = (50, 205, 50)  # green, when a method makes no important/diverse split
#: Pruned patches are veiled: mixed with this grey, keeping the rest of their own colour, so that
#: what was dropped stays visible on dark and light images alike.
VEIL = (128, 128, 128)
VEIL_SHARE = 0.6
MIN_SIDE = 336  # small images are enlarged so that the marks stay legible
ASPECT_TOLERANCE = 0.05  # relative difference of image and grid aspect ratios accepted as the same


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


def _font(size: int) -> "ImageFont.ImageFont | ImageFont.FreeTypeFont":
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only its small bitmap font
        return ImageFont.load_default()


def image_as_seen(image: "Image.Image", processor: Any) -> "Image.Image":
    """``image`` resized and cropped the way ``processor`` (a processor or its image processor)
    prepares it for the vision tower: the picture whose patches a selection's grid covers.

    The processor runs on ``image`` and its normalisation is undone; for processors that cut an
    image into several views (LLaVA-NeXT), the first view, the whole image at base resolution;
    for Qwen-VL processors, the image resized as they resize it.
    """
    image_processor = getattr(processor, "image_processor", processor)
    if hasattr(image_processor, "merge_size"):
        # Qwen-VL processors flatten the patches but only resize the image (to whole merged tokens).
        _, rows, columns = image_processor(images=image.convert("RGB"), return_tensors="pt")["image_grid_thw"][0].tolist()
        return image.convert("RGB").resize((columns * image_processor.patch_size, rows * image_processor.patch_size))
    pixel_values = image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
    view = pixel_values.reshape(-1, *pixel_values.shape[-3:])[0]
    return pixel_values_to_image(view, image_processor.image_mean, image_processor.image_std)


def draw_selection(
    image: "Image.Image",
    keep: "torch.Tensor | np.ndarray | Sequence[bool]",
    important: "torch.Tensor | np.ndarray | Sequence[bool] | None" = None,
    grid: tuple[int, int] | None = None,
    legend: bool = True,
    title: Sequence[str] = (),
    processor: Any = None,
) -> "Image.Image":
    """Return a copy of ``image`` showing which patches were kept.

    Args:
        image: the image as the vision tower saw it (after the processor's resize and centre
            crop), e.g. from :func:`pixel_values_to_image`; or, with ``processor``, the original
            image, which is then resized and cropped the same way (:func:`image_as_seen`). So the
            picture shows the model's view: parts of the original that the crop cut off are not
            drawn, and the grid never stretches over them.
        keep: (N,) or (rows, cols) bool, True for kept patches, in raster order.
        important: same shape, the attention-chosen subset of ``keep`` (drawn orange; the rest
            of ``keep`` blue); None draws every kept patch green.
        grid: (rows, cols) of the patch grid; default: square.
        legend: add a strip below the image with the counts.
        title: lines written above the image (e.g. the question and the answers).
        processor: the model's processor (or image processor), to bring an original image to
            the model's view.

    Pruned patches are veiled in grey (their content stays visible); kept patches get a coloured
    frame. ``ValueError`` when the image's aspect ratio is not the grid's: it is then not the
    image the model saw (pass ``processor``).
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

    base = (image if processor is None else image_as_seen(image, processor)).convert("RGB")
    if abs(base.width * rows / (base.height * cols) - 1) > ASPECT_TOLERANCE:
        raise ValueError(
            f"image must be as the model saw it, with the grid's aspect ratio ({rows} x {cols} patches); got "
            f"{base.width}x{base.height} pixels: pass processor= to resize and crop it as the model did"
        )
    scale = max(1.0, MIN_SIDE / min(base.size))
    if scale > 1.0:
        base = base.resize((round(base.width * scale), round(base.height * scale)), Image.NEAREST)
    width, height = base.size
    veiled = Image.blend(base, Image.new("RGB", base.size, VEIL), VEIL_SHARE)
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
            canvas.paste(veiled.crop(box), box[:2])
            continue
        colour = KEPT if chosen is None else (IMPORTANT if chosen[index] else DIVERSE)
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=colour, width=line)

    size = max(12, round(width / 24))
    font = _font(size)
    lines = [wrapped for text in title for wrapped in _wrap(text, font, width - size)]
    top = round(len(lines) * size * 1.3 + size * 0.6) if lines else 0
    strip = round(size * 2) if legend else 0
    framed = Image.new("RGB", (width, top + height + strip), (255, 255, 255))
    framed.paste(canvas, (0, top))
    draw = ImageDraw.Draw(framed)
    for i, text in enumerate(lines):
        draw.text((size // 2, round(size * 0.3 + i * size * 1.3)), text, fill=(0, 0, 0), font=font)
    if legend:
        total, pruned = len(kept), len(kept) - sum(kept)
        if chosen is None:
            entries = [(KEPT, f"kept {sum(kept)}")]
        else:
            n_important = sum(chosen)
            entries = [(IMPORTANT, f"important {n_important}"), (DIVERSE, f"diverse {sum(kept) - n_important}")]
        entries.append((VEIL, f"pruned {pruned} of {total}"))
        x, y = size // 2, top + height + size // 2
        for colour, text in entries:
            draw.rectangle((x, y, x + size, y + size), fill=colour, outline=(0, 0, 0))
            draw.text((x + round(size * 1.3), y - size // 8), text, fill=(0, 0, 0), font=font)
            x += round(size * 1.3) + int(draw.textlength(text, font=font)) + size
    return framed


def _wrap(text: str, font: Any, width: int) -> list[str]:
    """``text`` in lines that fit ``width`` pixels, broken between words."""
    from PIL import Image, ImageDraw

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


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
