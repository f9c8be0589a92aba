"""The batches the adapter tests run: left padding, prompts of different lengths, two images in
one prompt, and for LLaVA-NeXT three crop grids (1x2 and 2x1 with unpadding, 2x2) in one batch."""

from __future__ import annotations

from tests.tiny_models import tiny_inputs, tiny_llava, tiny_llava_next

TEXTS = ["w1 w2 <image> w3", "<image> w4 <image> w5 w6 w7"]
BUILDERS = {"llava": tiny_llava, "llava_next": tiny_llava_next}
#: (height, width) of the three images; None: LLaVA's square default.
SIZES = {"llava": None, "llava_next": [(20, 60), (64, 30), (60, 60)]}
FAMILIES = tuple(BUILDERS)


def model_and_inputs(family: str, attn_implementation: str = "sdpa", texts: list[str] = TEXTS):
    model = BUILDERS[family](attn_implementation=attn_implementation)
    sizes = SIZES[family] if texts is TEXTS else None
    if sizes is None and family == "llava_next":
        sizes = [(40, 50)] * sum(text.count("<image>") for text in texts)
    return model, tiny_inputs(model, texts, image_sizes=sizes)
