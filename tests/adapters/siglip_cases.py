"""The batches the Gemma 3 and LLaVA-OneVision tests run, the reference rows for them, and what
the language model saw: left padding and prompts of different lengths; Gemma 3 with two images in
one prompt; OneVision with anyres images of different shapes (one unpadded, one downsampled), a
prompt with two images (base crops only), and a batch of two videos."""

from __future__ import annotations

import torch


from tests.tiny_models import PAD_ID, VIDEO_ID, tiny_gemma3, tiny_inputs, tiny_onevision
from tests.adapters import reference_siglip as ref

STEPS = 3
FRAMES = 3
TEXTS = ["w1 w2 <image> w3", "<image> w4 <image> w5 w6 w7"]


def gemma_case():
    model = tiny_gemma3()
    return model, tiny_inputs(model, TEXTS)


def onevision_case(sizes=((30, 100), (100, 110), (28, 28)), texts=TEXTS):
    model = tiny_onevision()
    return model, tiny_inputs(model, texts, image_sizes=list(sizes))


def video_inputs(seed: int = 1):
    """Two videos of FRAMES frames, left padded: each frame pools to 4 x 4 tokens, plus one newline."""
    torch.manual_seed(seed)
    pixels = torch.randn(2, FRAMES, 3, 28, 28)
    run = [VIDEO_ID] * (FRAMES * 16 + 1)
    ids = torch.tensor([[PAD_ID, PAD_ID, 5, 6, *run, 7], [8, *run, 9, 10, 11, 12]])
    return {"input_ids": ids, "attention_mask": (ids != PAD_ID).long(), "pixel_values_videos": pixels}


def reference_rows(model, inputs, method, num_tokens, budget="per_crop", **options):
    items = {}
    if isinstance(model, ref.Gemma3ForConditionalGeneration):
        items[model.config.image_token_id] = ref.gemma_images(
            model, inputs["pixel_values"], method, num_tokens, budget, **options
        )
    elif "pixel_values" in inputs:
        items[model.config.image_token_id] = ref.onevision_images(
            model, inputs["pixel_values"], inputs["image_sizes"], inputs["batch_num_images"], method, num_tokens, budget,
            **options,
        )
    if "pixel_values_videos" in inputs:
        items[model.config.video_token_id] = ref.onevision_videos(
            model, inputs["pixel_values_videos"], method, num_tokens, budget, **options
        )
    return ref.sequences(model, inputs["input_ids"], inputs["attention_mask"], items)


def language_inputs(model, inputs, **generate):
    """Generated ids, and per row the real (unpadded) embeddings the language model saw at the prefill."""
    seen, masks = [], []

    def on_model(module, args, kwargs):
        if not masks:
            masks.append(kwargs["attention_mask"])

    def on_language_model(module, args, kwargs):
        if not seen:
            seen.append(kwargs["inputs_embeds"])

    handles = [
        model.model.register_forward_pre_hook(on_model, with_kwargs=True),
        model.model.language_model.register_forward_pre_hook(on_language_model, with_kwargs=True),
    ]
    try:
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, **generate)
    finally:
        for handle in handles:
            handle.remove()
    return out, [row[mask.bool()] for row, mask in zip(seen[0], masks[0])]


def mixed_case():
    """OneVision images (one unpadded, one downsampled) and a video after them in each prompt."""
    model, inputs = onevision_case(((30, 100), (110, 100)), ["w1 w2 <image> w3", "<image> w4 w5 w6 w7"])
    video = video_inputs()
    run = video["input_ids"][1:, 1 : 1 + FRAMES * 16 + 1].expand(2, -1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], run], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(run)], dim=1)
    inputs["pixel_values_videos"] = video["pixel_values_videos"]
    return model, inputs


def video_case():
    """LLaVA-OneVision and a batch of two videos (:func:`video_inputs`)."""
    return tiny_onevision(), video_inputs()


#: Every SigLIP case by name: () -> (model, inputs).
CASES = {
    "gemma3": gemma_case,
    "onevision": onevision_case,
    "onevision_downsampled": lambda: onevision_case(((30, 100), (110, 100)), ["w1 w2 <image> w3", "<image> w4 w5 w6 w7"]),
    "onevision_video": video_case,
    "onevision_mixed": mixed_case,
}
