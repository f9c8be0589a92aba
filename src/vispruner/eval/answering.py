"""Greedy one-word answers from a VLM, for a batch of (image, question) pairs."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image


def normalise(text: str) -> str:
    """The first word of ``text``, lower-cased, without punctuation (``"Yes."`` -> ``"yes"``)."""
    words = text.strip().lower().split()
    return words[0].strip(string.punctuation) if words else ""


def answer(
    model: Any, processor: Any, images: list[Image.Image], questions: list[str], max_new_tokens: int = 3
) -> list[str]:
    """Greedy answers to ``questions[i]`` about ``images[i]``, normalised to one word each."""
    import torch

    import vispruner
    from vispruner.testbed.model import encode

    inputs = encode(processor, images, questions)
    # The questions as asked, for CDPruner's clip option (which embeds them with CLIP's text tower).
    with torch.inference_mode(), vispruner.instructions(model, questions):
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = output[:, inputs["input_ids"].shape[1] :]
    return [normalise(text) for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
