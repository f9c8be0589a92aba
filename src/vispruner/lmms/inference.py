"""Chat prompts, batched generation and log-likelihoods for any model :func:`vispruner.apply` supports.

Plain functions of a Hugging Face model and processor, so that they are tested without lmms-eval.
Batches are left-padded: every row's prompt ends at the last column, where generation continues
and where a continuation's tokens sit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import vispruner

#: lmms-eval prompts may carry LLaVA's image placeholder; the chat template places images instead.
IMAGE_PLACEHOLDER = "<image>"
#: Token cap when a task sets none (lmms-eval's Hugging Face models use the same).
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass
class Visuals:
    """One request's images (PIL) and videos ((T, H, W, 3) uint8 frames), in the task's order."""

    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class Generation:
    """A task's ``generation_kwargs`` as ``generate()`` takes them; greedy unless it asks to sample."""

    until: tuple[str, ...]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1

    @classmethod
    def from_task(cls, gen_kwargs: dict[str, Any], eos: str) -> "Generation":
        until = gen_kwargs.get("until", [eos])
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"generation_kwargs until must be a string or a list of strings; got {until!r}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") is False:
            temperature = 0.0
        return cls(
            until=tuple(stop for stop in until if stop),
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            temperature=temperature,
            top_p=gen_kwargs.get("top_p"),
            num_beams=int(gen_kwargs.get("num_beams") or 1),
        )

    def generate_kwargs(self) -> dict[str, Any]:
        sampling = self.temperature > 0
        chosen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": sampling, "num_beams": self.num_beams}
        if sampling:
            chosen["temperature"] = self.temperature
            if self.top_p is not None:
                chosen["top_p"] = self.top_p
        return chosen


def split_visuals(visuals: Sequence[Any] | None, max_frames: int) -> Visuals:
    """A task's ``doc_to_visual`` output as :class:`Visuals`: PIL images, and video paths decoded."""
    from PIL import Image

    found = Visuals()
    for visual in visuals or []:
        if isinstance(visual, Image.Image):
            found.images.append(visual.convert("RGB"))
        elif isinstance(visual, str):
            found.videos.append(video_frames(visual, max_frames))
        else:
            raise ValueError(f"visual inputs must be PIL images or video paths; got {type(visual).__name__}")
    return found


def video_frames(path: str, count: int) -> Any:
    """``count`` frames spread evenly over the video at ``path`` (all if it has fewer), (T, H, W, 3) uint8."""
    import av
    import numpy as np

    with av.open(path) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"video {path!r} has no frames")
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return np.stack([frames[i] for i in picks])


def question(context: str) -> str:
    """A request's text without its image placeholders: the user turn's text, and the question
    that CDPruner's ``clip`` option embeds (with the task's instructions around it, if any)."""
    return context.replace(IMAGE_PLACEHOLDER, "").strip()


def chat_prompt(processor: Any, context: str, visuals: Visuals) -> str:
    """``context`` after the request's images and videos, as one user turn of the model's chat template."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in visuals.images]
    content += [{"type": "video"} for _ in visuals.videos]
    content.append({"type": "text", "text": question(context)})
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(model: Any, processor: Any, texts: list[str], visuals: Sequence[Visuals]) -> Any:
    """A left-padded batch on the model's device, floating inputs in the model's dtype."""
    images = [image for v in visuals for image in v.images]
    videos = [video for v in visuals for video in v.videos]
    if videos and getattr(processor, "video_processor", None) is None:
        raise ValueError(f"{type(model).__name__} takes no video (its processor has no video processor)")
    extra: dict[str, Any] = {}
    if images:
        extra["images"] = images
    if videos:
        extra["videos"] = videos
    processor.tokenizer.padding_side = "left"  # batched generation continues every row at the same column
    inputs = processor(text=texts, padding=True, return_tensors="pt", **extra)
    return inputs.to(model.device, dtype=model.dtype)  # BatchFeature casts floating tensors only


def generate(model: Any, processor: Any, requests: Sequence[tuple[str, Visuals]], generation: Generation) -> list[str]:
    """The model's reply to each ``(context, visuals)``, cut before the first stop sequence."""
    import torch

    texts = [chat_prompt(processor, context, visuals) for context, visuals in requests]
    inputs = encode(model, processor, texts, [visuals for _, visuals in requests])
    settings = generation.generate_kwargs()
    if generation.until:
        start = inputs["input_ids"].shape[1]
        settings["stopping_criteria"] = [StopSequences(processor.tokenizer, generation.until, start)]
    with torch.inference_mode(), vispruner.instructions(model, [question(context) for context, _ in requests]):
        output = model.generate(**inputs, **settings)
    replies = processor.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [cut(reply, generation.until) for reply in replies]


class StopSequences:
    """Stops each row once its decoded reply holds a stop sequence.

    ``generate(stop_strings=...)`` needs a tokenizer whose vocabulary maps to text piece by piece,
    which word-level ones (the testbed's) are not; decoding the reply works with any tokenizer.
    """

    def __init__(self, tokenizer: Any, until: Sequence[str], start: int) -> None:
        self.tokenizer, self.until, self.start = tokenizer, tuple(until), start

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        replies = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(stop in reply for stop in self.until) for reply in replies], device=input_ids.device)


def cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    end = min((text.find(stop) for stop in until if stop in text), default=len(text))
    return text[:end]


def loglikelihoods(model: Any, processor: Any, requests: Sequence[tuple[str, str, Visuals]]) -> list[tuple[float, bool]]:
    """For each ``(context, continuation, visuals)``: the continuation's log-probability after the
    chat prompt, and whether greedy decoding would produce exactly it."""
    import torch

    prompts = [chat_prompt(processor, context, visuals) for context, _, visuals in requests]
    visuals = [v for _, _, v in requests]
    whole = encode(model, processor, [p + continuation for p, (_, continuation, _) in zip(prompts, requests)], visuals)
    alone = encode(model, processor, prompts, visuals)
    lengths = (whole["attention_mask"].sum(1) - alone["attention_mask"].sum(1)).tolist()
    with torch.inference_mode(), vispruner.instructions(model, [question(context) for context, _, _ in requests]):
        logits = model(**whole).logits  # FastV returns kept positions only; the last ones are the text's
    ids = whole["input_ids"]
    results = []
    for row, length in enumerate(lengths):
        if length < 1:
            raise ValueError(f"continuation {requests[row][1]!r} adds no token to its prompt")
        scores = torch.log_softmax(logits[row, -length - 1 : -1].float(), dim=-1)
        target = ids[row, -length:]
        total = scores.gather(1, target[:, None]).sum().item()
        results.append((total, bool((scores.argmax(-1) == target).all())))
    return results


def batches(keys: Sequence[Hashable], lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices grouped by key (requests sharing generation settings), longest first, ``size`` at a time."""
    groups: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    out = []
    for members in groups.values():
        members.sort(key=lambda i: -lengths[i])
        out += [members[i : i + size] for i in range(0, len(members), size)]
    return out
