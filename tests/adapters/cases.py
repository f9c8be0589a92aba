"""The batches the adapter tests run: left padding, prompts of different lengths, two images in
one prompt, and for LLaVA-NeXT three crop grids (1x2 and 2x1 with unpadding, 2x2) in one batch;
and :func:`prepared`, such a batch with a patched model and the step-by-step reference's rows."""

from __future__ import annotations

import torch

import vispruner
from tests.adapters.reference import reference_images, reference_sequences
from tests.tiny_models import tiny_inputs, tiny_llava, tiny_llava_next

TEXTS = ["w1 w2 <image> w3", "<image> w4 <image> w5 w6 w7"]
BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next}
#: (height, width) of the three images; None: LLaVA's square default.
SIZES = {"llava": None, "llava_next": [(20, 60), (64, 30), (60, 60)]}
FAMILIES = tuple(BUILDERS)
#: Visual tokens kept per crop by :func:`prepared`.
NUM_TOKENS = 8


#: LLaVA-NeXT's image size in other prompts than TEXTS.
OTHER_SIZE = {"llava": None, "llava_next": (40, 50)}


def model_and_inputs(family: str, attn_implementation: str = "sdpa", texts: list[str] = TEXTS, **build):
    model = BUILDERS[family](attn_implementation=attn_implementation, **build)
    return model, inputs_for(model, family, texts)


def prepared(
    family: str,
    attn_implementation: str = "sdpa",
    budget: str = "per_crop",
    method: str = "vispruner",
    texts: list[str] = TEXTS,
    num_tokens: int = NUM_TOKENS,
    positions: str | None = None,
    **options,
):
    """A tiny model patched to keep ``num_tokens``, its inputs, and the step-by-step reference's
    images and rows for them (reference.py), computed before patching."""
    model, inputs = model_and_inputs(family, attn_implementation, texts)
    images = reference_images(
        model, inputs["pixel_values"], inputs.get("image_sizes"), num_tokens, method, budget, **options
    )
    rows = reference_sequences(model, inputs["input_ids"], inputs["attention_mask"], images)
    vispruner.apply(model, num_tokens, method=method, budget=budget, positions=positions, **options)
    return model, inputs, images, rows


def inputs_for(model, family: str, texts: list[str]):
    sizes = SIZES[family] if texts is TEXTS else None
    if sizes is None and OTHER_SIZE[family] is not None:
        sizes = [OTHER_SIZE[family]] * sum(text.count("<image>") for text in texts)
    return tiny_inputs(model, texts, image_sizes=sizes)


def equal_length_texts(model, family: str) -> list[str]:
    """Two prompts of one length, so unpadded, with one image and with two: pruning keeps
    different numbers of their tokens, and the compacted batch is padded though the input is not."""
    placeholders = int(inputs_for(model, family, ["<image>"])["attention_mask"].sum())
    return ["<image> " + " ".join(["w4"] * (placeholders + 1)), "<image> w5 <image>"]


def right_padded(inputs) -> dict:
    """``inputs`` with each row's padding moved from the left to the right, as in training batches."""
    order = torch.argsort((inputs["attention_mask"] == 0).long(), dim=1, stable=True)
    moved = dict(inputs)
    for name in ("input_ids", "attention_mask"):
        moved[name] = inputs[name].gather(1, order)
    return moved
