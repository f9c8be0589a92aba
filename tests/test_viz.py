"""The kept-token picture: dimmed where pruned, framed in the right colour where kept."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageChops

from vispruner.viz import DIVERSE, IMPORTANT, KEPT, VEIL, VEIL_SHARE, draw_selection, pixel_values_to_image


def flat_image(size: int = 336, colour=(200, 200, 200)) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def test_pruned_patches_are_dimmed_and_kept_ones_framed():
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[0, 0] = keep[3, 3] = True
    important = torch.zeros(4, 4, dtype=torch.bool)
    important[0, 0] = True
    picture = draw_selection(flat_image(), keep, important, legend=False)
    assert picture.size == (336, 336)
    patch = 336 // 4
    centre = lambda r, c: picture.getpixel((c * patch + patch // 2, r * patch + patch // 2))  # noqa: E731
    assert centre(0, 0) == (200, 200, 200)  # kept: untouched inside the frame
    # pruned: veiled, mixed with the grey VEIL in the share VEIL_SHARE
    expected = [200 * (1 - VEIL_SHARE) + v * VEIL_SHARE for v in VEIL]
    assert all(abs(got - want) <= 1 for got, want in zip(centre(1, 1), expected))  # PIL rounds its blend
    assert picture.getpixel((1, 1)) == IMPORTANT
    assert picture.getpixel((3 * patch + 1, 3 * patch + 1)) == DIVERSE


def test_no_split_draws_kept_patches_green_and_small_images_grow():
    keep = torch.tensor([True, False, False, True])
    picture = draw_selection(flat_image(28), keep)
    assert picture.width == 336 and picture.height > 336  # enlarged, plus the legend strip
    assert picture.getpixel((0, 0)) == KEPT


def test_non_square_grid():
    keep = torch.tensor([True, False, True, False, True, False])
    picture = draw_selection(Image.new("RGB", (90, 60), (200, 200, 200)), keep, grid=(2, 3), legend=False)
    assert picture.getpixel((0, 0)) == KEPT


@pytest.mark.parametrize(
    "keep,important,grid,message",
    [
        (torch.ones(5, dtype=torch.bool), None, None, "grid must be given"),
        (torch.ones(6, dtype=torch.bool), None, (2, 2), r"rows \* cols == 6"),
        (torch.ones(4), None, None, "keep must be a boolean mask"),
        (torch.tensor([True, False, True, True]), torch.tensor([False, True, False, False]), None, "subset of keep"),
        (torch.ones(4, dtype=torch.bool), torch.ones(9, dtype=torch.bool), None, "as many entries as keep"),
    ],
)
def test_errors(keep, important, grid, message):
    with pytest.raises(ValueError, match=message):
        draw_selection(flat_image(), keep, important, grid)


def test_pixel_values_round_trip():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    image = Image.new("RGB", (8, 8), (255, 0, 128))
    pixels = torch.tensor([255, 0, 128], dtype=torch.float32).view(3, 1, 1).expand(3, 8, 8) / 255
    normalised = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert pixel_values_to_image(normalised, mean, std).getpixel((3, 3)) == image.getpixel((3, 3))
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(3, H, W\)"):
        pixel_values_to_image(torch.zeros(1, 3, 8, 8), mean, std)


def test_an_image_the_model_did_not_see_is_refused_and_processor_maps_it():
    from vispruner.testbed.model import build_processor

    # 400 x 112: the CLIP processor keeps the height (112) and crops the centre 112 columns.
    image = Image.new("RGB", (400, 112), (0, 0, 255))
    image.paste((255, 0, 0), (144, 0, 256, 112))
    keep = torch.ones(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"image must be as the model saw it.*400x112 pixels.*processor="):
        draw_selection(image, keep)
    picture = draw_selection(image, keep, processor=build_processor(), legend=False)
    assert picture.size == (336, 336)
    inside = [picture.getpixel((x, y)) for x in range(21, 336, 42) for y in range(21, 336, 42)]  # patch centres
    assert all(r > 250 and g < 5 and b < 5 for r, g, b in inside)  # only the centre crop is drawn


def test_title_lines_go_above_the_image():
    keep = torch.ones(4, dtype=torch.bool)
    plain = draw_selection(flat_image(), keep, legend=False)
    titled = draw_selection(flat_image(), keep, legend=False, title=["Q: what?", "all tokens: red", "vispruner: red"])
    assert titled.width == plain.width and titled.height > plain.height + 3 * 12
    assert titled.crop((0, titled.height - 336, 336, titled.height)).tobytes() == plain.tobytes()
    band = titled.crop((0, 0, 336, titled.height - 336))
    assert ImageChops.invert(band).getbbox() is not None  # something other than white: the text

