"""The families added with issue 23, one :class:`Case` each, for their reference tests
(test_new_families.py) and the contract test: a tiny model builder, a left-padded batch (images of
different sizes, several images and a video in a prompt), and the step-by-step reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from tests import tiny_internvl, tiny_mistral3, tiny_smolvlm

from .reference_tiles import internvl_tiles, mistral3_images, placeholder_rows, smolvlm_tiles


@dataclass(frozen=True)
class Case:
    """``build(**options)`` a tiny model (``text_layers``, ``attn_implementation``, ...);
    ``inputs()`` its batch; ``items(model, inputs, method, num_tokens, **options)`` the reference's
    (tokens, keep) per budget unit; ``units(inputs)`` how many units the batch has; ``per_image``:
    whether ``budget="per_image"`` runs (else the ``ValueError`` names the family)."""

    name: str
    build: Callable[..., Any]
    inputs: Callable[[], dict]
    items: Callable[..., list]
    units: Callable[[dict], int]
    per_image: bool = False

    def rows(self, model, inputs, method: str, num_tokens: int, **options) -> list:
        items = self.items(model, inputs, method, num_tokens, **options)
        return placeholder_rows(model, inputs["input_ids"], inputs["attention_mask"], items)


CASES = {
    "internvl": Case(
        "InternVL",
        tiny_internvl.tiny_internvl,
        lambda: tiny_internvl.internvl_inputs(tiny_internvl.PROMPTS),
        lambda model, inputs, *args, **options: internvl_tiles(model, inputs["pixel_values"], *args, **options),
        lambda inputs: inputs["pixel_values"].shape[0],
    ),
    **{
        family: Case(
            "SmolVLM / Idefics3",
            build,
            lambda: tiny_smolvlm.smolvlm_inputs(tiny_smolvlm.PROMPTS),
            lambda model, inputs, *args, **options: smolvlm_tiles(model, inputs["pixel_values"], *args, **options),
            lambda inputs: int(inputs["pixel_attention_mask"].flatten(2).any(dim=2).sum()),
        )
        for family, build in (("smolvlm", tiny_smolvlm.tiny_smolvlm), ("idefics3", tiny_smolvlm.tiny_idefics3))
    },
    "mistral3": Case(
        "Mistral 3",
        tiny_mistral3.tiny_mistral3,
        lambda: tiny_mistral3.mistral3_inputs(tiny_mistral3.PROMPTS),
        lambda model, inputs, *args, **options: mistral3_images(
            model, inputs["pixel_values"], inputs["image_sizes"], *args, **options
        ),
        lambda inputs: inputs["image_sizes"].shape[0],
        per_image=True,
    ),
}
