"""The batches the contract test runs on the families added with issue 23, one entry per family:
a model builder taking ``text_layers``, its inputs (left padding, images of different sizes,
several images and a video in a prompt) and the reference rows (text + kept tokens per row)."""

from __future__ import annotations

from tests.tiny_internvl import PROMPTS as INTERNVL_PROMPTS
from tests.tiny_internvl import TOKENS as INTERNVL_TOKENS
from tests.tiny_internvl import internvl_inputs, tiny_internvl

from .reference_tiles import internvl_tiles, tile_rows


def internvl_case(text_layers: int):
    model = tiny_internvl(text_layers=text_layers)
    return model, internvl_inputs(INTERNVL_PROMPTS)


def internvl_rows(model, inputs, method: str, num_tokens: int):
    tiles = internvl_tiles(model, inputs["pixel_values"], method, num_tokens)
    return tile_rows(model, inputs["input_ids"], inputs["attention_mask"], tiles, INTERNVL_TOKENS)


#: family -> (model and inputs, reference rows).
CASES = {
    "internvl": (internvl_case, internvl_rows),
}
