"""Train a testbed VLM the way LLaVA was made, on CPU.

    python -m vispruner.testbed.train [--arch llava|qwen] [--out DIR] [--seed 0]

``--arch`` picks the architecture (:mod:`vispruner.testbed.architectures`): the LLaVA testbed
(default) or the Qwen2.5-VL one. Stage 1 trains the vision tower alone: heads on a summary of
the image (LLaVA: its [CLS] token, so that [CLS] attention has to find the objects, the signal
VisPruner ranks patches by; Qwen, which has no [CLS]: the mean over the image) predict which
(colour, shape) pairs are present and how many objects there are; heads on each of the 8 x 8
cells the language model will see name the colour and shape it shows. Stage 2 (LLaVA's
projector alignment, off by default: ``--align-steps``) trains the projector alone on the
questions. Stage 3 trains projector and language model together on the questions, tower frozen,
its features computed once.

A language model trained from scratch sits at the answer prior for a long time before it learns
to look for the object a question names. Two training aids get it there within the CPU budget:
a curriculum that first shows it only the patches with objects plus a few others (growing to
all patches by ``--curriculum`` steps), and a grounding loss, a linear probe on the middle decoder
layer that must tell at each image token whether it shows an object the question is about.
The Qwen testbed's decoder does not learn this from random weights within the budget (it
plateaus at 49% held-out); its recipe starts the decoder from the bundled LLaVA testbed's
(``--language-init testbed``), as LLaVA starts from a pretrained language model.
The stage-1 heads and the probe are thrown away: what is saved is a stock
``LlavaForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration`` and its processor.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .architectures import ARCHITECTURES
from .model import NUM_PATCHES, PATCH_SIZE, prompt
from .scenes import COLOURS, MAX_OBJECTS, QUESTION_TYPES, SHAPES, Question, Scene, ask, held_out, make_scene

PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
GRID = int(math.isqrt(NUM_PATCHES))


def tower_targets(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Targets of stage 1: presence (B, 18), object count (B,), per-patch object id (B, N), 0 = none."""
    presence = torch.zeros(len(scenes), len(PAIRS))
    count = torch.zeros(len(scenes), dtype=torch.long)
    patch = torch.zeros(len(scenes), NUM_PATCHES, dtype=torch.long)
    centres = (torch.arange(GRID) + 0.5) * PATCH_SIZE
    for b, scene in enumerate(scenes):
        count[b] = len(scene.objects)
        best = torch.zeros(GRID, GRID)
        for obj in scene.objects:
            index = PAIRS.index((obj.colour, obj.shape))
            presence[b, index] = 1
            # Share of each patch covered by the object's box; a patch names the object covering most of it.
            half = obj.size / 2
            ox = ((centres + PATCH_SIZE / 2).clamp(max=obj.x + half) - (centres - PATCH_SIZE / 2).clamp(min=obj.x - half)).clamp(min=0)
            oy = ((centres + PATCH_SIZE / 2).clamp(max=obj.y + half) - (centres - PATCH_SIZE / 2).clamp(min=obj.y - half)).clamp(min=0)
            cover = (oy[:, None] * ox[None, :]) / PATCH_SIZE**2
            take = (cover > best) & (cover > 0.15)
            best = torch.where(take, cover, best)
            patch[b] = torch.where(take.flatten(), index + 1, patch[b])
    return {"presence": presence, "count": count, "patch": patch}


class TowerHeads(nn.Module):
    """Stage-1 heads: on [CLS] (presence, count) and on every patch (colour and shape it shows, if any)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.presence = nn.Linear(width, len(PAIRS))
        self.count = nn.Linear(width, MAX_OBJECTS + 1)
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)  # class 0 unused: shape is asked only of objects

    def loss(self, summary, patches, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """``summary`` (B, C) of each image, ``patches`` (B, 64, C) of its cells."""
        presence_logits, count_logits = self.presence(summary), self.count(summary)
        # Pair id p + 1 (0 = none) factorises into colour p // len(SHAPES) and shape p % len(SHAPES).
        pair = targets["patch"] - 1
        colour = torch.where(pair >= 0, pair // len(SHAPES) + 1, 0)
        shape = torch.where(pair >= 0, pair % len(SHAPES) + 1, 0)
        colour_logits, shape_logits = self.colour(patches), self.shape(patches)
        objects = pair >= 0
        # Shape is learnt only where there is one: over all patches, "none" would drown it out.
        loss = (
            F.binary_cross_entropy_with_logits(presence_logits, targets["presence"])
            + F.cross_entropy(count_logits, targets["count"])
            + F.cross_entropy(colour_logits.flatten(0, 1), colour.flatten())
            + 2 * F.cross_entropy(shape_logits[objects], shape[objects])
        )
        stats = {
            "presence_acc": ((presence_logits > 0) == targets["presence"].bool()).float().mean().item(),
            "count_acc": (count_logits.argmax(-1) == targets["count"]).float().mean().item(),
            "object_colour_acc": (colour_logits.argmax(-1) == colour)[objects].float().mean().item(),
            "object_shape_acc": (shape_logits.argmax(-1) == shape)[objects].float().mean().item(),
        }
        return loss, stats


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_tower(model, arch, processor, steps: int, batch: int, lr: float, seed: int, log) -> None:
    tower = arch.tower(model)
    heads = TowerHeads(arch.cell_width(model))
    params = list(tower.parameters()) + list(heads.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    tower.train()
    rng = random.Random(seed)
    for step in range(steps):
        scenes = [make_scene(rng.randrange(HELD_OUT_LIMIT)) for _ in range(batch)]
        loss, stats = heads.loss(*arch.tower_outputs(model, arch.pixels(processor, scenes)), tower_targets(scenes))
        for group in optimiser.param_groups:
            group["lr"] = lr * cosine(step, steps, 50)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"tower {step:5d}/{steps} loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    tower.eval()


#: Training scene seeds are drawn below this; held-out ones (scenes.HELD_OUT_START) lie above.
HELD_OUT_LIMIT = 5_000_000


@torch.no_grad()
def image_features(model, arch, processor, scenes: list[Scene], chunk: int = 256) -> torch.Tensor:
    """(S, N, C) frozen-tower features that the projector reads, stored as float16."""
    parts = []
    for i in range(0, len(scenes), chunk):
        parts.append(arch.image_features(model, arch.pixels(processor, scenes[i : i + chunk])).to(torch.float16))
    return torch.cat(parts)


@dataclass
class Batch:
    """Right-padded rows of prompt, answer word and </s>: ``ids``, ``mask``, ``labels`` (only the
    answer and </s> count) with the kept image tokens only; ``full_ids`` and ``full_mask`` with all
    of them; ``columns`` (B, L): where each token of ``ids`` sits in ``full_ids``."""

    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    full_ids: torch.Tensor
    full_mask: torch.Tensor
    columns: torch.Tensor


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """(B, L) right-padded with ``value``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), value)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
    return out


class QuestionBatcher:
    """Token ids of the chat prompt with the image expanded, built once per question text."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self.cache: dict[str, list[int]] = {}

    def ids(self, question: str) -> list[int]:
        """The prompt's ids with one image placeholder per cell."""
        if question not in self.cache:
            ids = self.tokenizer(prompt(self.processor, question), add_special_tokens=True)["input_ids"]
            position = ids.index(self.image_id)
            self.cache[question] = ids[:position] + [self.image_id] * NUM_PATCHES + ids[position + 1 :]
        return self.cache[question]

    def build(self, questions: list[str], answers: list[str], keep: torch.Tensor | None = None) -> Batch:
        """Row b keeps the image tokens where ``keep[b]`` (B, N) is true (default: all)."""
        answer_ids = self.tokenizer.convert_tokens_to_ids(answers)
        full_rows, rows, columns, labels = [], [], [], []
        for b, (question, answer) in enumerate(zip(questions, answer_ids)):
            full = self.ids(question) + [answer, self.tokenizer.eos_token_id]
            start = full.index(self.image_id)
            # One list per row: indexing the tensor once per image token cost 40x more.
            shown = None if keep is None else keep[b].tolist()
            kept = [i for i, token in enumerate(full) if token != self.image_id or shown is None or shown[i - start]]
            full_rows.append(full)
            rows.append([full[i] for i in kept])
            columns.append(kept)
            labels.append([-100] * (len(kept) - 2) + full[-2:])
        pad = self.tokenizer.pad_token_id
        return Batch(
            ids=pad_rows(rows, pad),
            mask=pad_rows([[1] * len(r) for r in rows], 0),
            labels=pad_rows(labels, -100),
            full_ids=pad_rows(full_rows, pad),
            full_mask=pad_rows([[1] * len(r) for r in full_rows], 0),
            columns=pad_rows(columns, 0),
        )


def language_forward(model, arch, batch: Batch, features, keep: torch.Tensor | None = None, layer: int | None = None):
    """Logits of the stock model on precomputed tower features (the same path as ``forward``),
    with only the cells in ``keep`` (B, N) when given (the batch built with the same ``keep``),
    and the hidden states after decoder layer ``layer`` when one is named."""
    embeds = model.get_input_embeddings()(batch.ids)
    image = arch.project(model, features.float())
    image = image[keep] if keep is not None else image
    slots = batch.ids == arch.image_token_id(model)
    embeds = embeds.masked_scatter(slots[..., None], image.to(embeds.dtype))
    positions = arch.positions(model, batch.full_ids, batch.full_mask, batch.columns)
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=batch.mask, position_ids=positions, output_hidden_states=layer is not None
    )
    logits = model.lm_head(out.last_hidden_state)
    return logits, (out.hidden_states[layer] if layer is not None else None)


def curriculum_keep(patch_labels: torch.Tensor, share_full: float, rng: random.Random) -> torch.Tensor:
    """(B, N) bool: all patches for a ``share_full`` of the rows; for the others, the patches that
    show objects and 4 to 12 others, so that the image tokens that matter are not yet drowned
    out by the background while the model learns to look for them."""
    keep = torch.ones(patch_labels.shape, dtype=torch.bool)
    for b in range(len(keep)):
        if rng.random() >= share_full:
            background = (patch_labels[b] == 0).nonzero().flatten().tolist()
            keep[b] = patch_labels[b] > 0
            keep[b, rng.sample(background, min(len(background), rng.randint(4, 12)))] = True
    return keep


def grounding_targets(patch_labels: torch.Tensor, questions: list[Question]) -> torch.Tensor:
    """(B, N) float: 1 where a patch shows an object the question is about."""
    targets = torch.zeros(patch_labels.shape)
    for b, question in enumerate(questions):
        for pair in question.about:
            targets[b] += (patch_labels[b] == PAIRS.index(pair) + 1).float()
    return targets


def sample_questions(scenes: list[Scene], indices: list[int], rng: random.Random):
    return [ask(scenes[i], rng.choice(QUESTION_TYPES), rng) for i in indices]


def answer_prior(scenes: list[Scene], rng: random.Random, n: int = 4000) -> dict[str, float]:
    """Accuracy of always giving the commonest answer of each question type."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for question in sample_questions(scenes, [rng.randrange(len(scenes)) for _ in range(n)], rng):
        counts[question.kind][question.answer] += 1
    return {kind: c.most_common(1)[0][1] / sum(c.values()) for kind, c in counts.items()}


@torch.no_grad()
def evaluate_features(model, arch, batcher, features, questions) -> dict[str, float]:
    """Per-type accuracy of the first answer word on precomputed features."""
    right: dict[str, list[bool]] = defaultdict(list)
    for i in range(0, len(questions), 256):
        qs = questions[i : i + 256]
        batch = batcher.build([q.text for q in qs], [q.answer for q in qs])
        logits, _ = language_forward(model, arch, batch, features[i : i + 256])
        labels = batch.labels
        first = (labels != -100).float().argmax(-1)
        rows = torch.arange(len(qs))
        predicted = logits[rows, first - 1].argmax(-1)
        for q, ok in zip(qs, (predicted == labels[rows, first]).tolist()):
            right[q.kind].append(ok)
    accuracy = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    accuracy["all"] = sum(sum(v) for v in right.values()) / len(questions)
    return accuracy


def train_language(model, arch, batcher, data, val, steps, batch, lr, seed, params, name, log, curriculum=0) -> None:
    """Answer loss plus the grounding loss (see the module notes) over ``steps`` steps; image
    sequences grow from object patches to all patches over the first ``curriculum`` steps."""
    features, scenes, patch_labels = data
    layer = model.config.text_config.num_hidden_layers // 2
    probe = nn.Linear(model.config.text_config.hidden_size, 1)
    optimiser = torch.optim.AdamW(params + list(probe.parameters()), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.model.language_model.train()
    for step in range(steps):
        indices = [rng.randrange(len(scenes)) for _ in range(batch)]
        questions = sample_questions(scenes, indices, rng)
        keep = curriculum_keep(patch_labels[indices], step / curriculum if step < curriculum else 1.0, rng)
        rows = batcher.build([q.text for q in questions], [q.answer for q in questions], keep)
        logits, hidden = language_forward(model, arch, rows, features[indices], keep, layer)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), rows.labels[:, 1:].flatten(), ignore_index=-100)
        slots = rows.ids == arch.image_token_id(model)
        grounding = F.binary_cross_entropy_with_logits(
            probe(hidden[slots]).squeeze(-1), grounding_targets(patch_labels[indices], questions)[keep]
        )
        for group in optimiser.param_groups:
            group["lr"] = lr * cosine(step, steps, 100)
        optimiser.zero_grad()
        (loss + grounding).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        if step % 100 == 0 or step == steps - 1:
            line = f"{name} {step:5d}/{steps} loss {loss.item():.3f} grounding {grounding.item():.3f}"
            if step % 500 == 0 or step == steps - 1:
                model.eval()
                line += " held-out " + " ".join(f"{k} {v:.3f}" for k, v in evaluate_features(model, arch, batcher, *val).items())
                model.model.language_model.train()
            log(line)
    model.eval()


def start_from_testbed_decoder(model, processor, log) -> None:
    """Copy the bundled LLaVA testbed's decoder into ``model``'s, word by word for the embeddings
    and the output layer (the vocabularies share their words, not their numbering); a word the
    testbed lacks keeps its random row. The decoder then already answers from image tokens that
    show objects, and stage 3 has to teach the projector to make such tokens, the way LLaVA
    starts from a pretrained language model. The decoders must have the same shape (biases
    the testbed lacks stay at their initial zeros)."""
    from .model import load_testbed

    donor, donor_processor = load_testbed()
    target = model.model.language_model
    weights = {k: v for k, v in donor.model.language_model.state_dict().items() if not k.startswith("embed_tokens.")}
    missing, unexpected = target.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.startswith("embed_tokens.") and not k.endswith(".bias")]
    if missing or unexpected:
        raise ValueError(f"the decoder does not have the LLaVA testbed's shape: missing {missing}, unexpected {unexpected}")
    donor_words = donor_processor.tokenizer.get_vocab()
    shared = [(i, donor_words[w]) for w, i in processor.tokenizer.get_vocab().items() if w in donor_words]
    rows, donor_rows = (torch.tensor(x) for x in zip(*shared))
    with torch.no_grad():
        target.embed_tokens.weight[rows] = donor.model.language_model.embed_tokens.weight[donor_rows]
        model.lm_head.weight[rows] = donor.lm_head.weight[donor_rows]
    log(f"decoder: started from the LLaVA testbed's ({len(shared)} of {len(processor.tokenizer)} words shared)")


def train(
    out: Path | None = None,
    arch: str = "llava",
    seed: int = 0,
    tower_steps: int = 2400,
    align_steps: int = 0,
    language_steps: int = 2400,
    batch: int = 32,
    language_batch: int = 32,
    train_scenes: int = 16000,
    val_size: int = 1000,
    tower_lr: float = 1e-3,
    language_lr: float = 1e-3,
    tower_checkpoint: Path | None = None,
    curriculum: int = 1200,
    language_init: str | None = None,
    log=print,
) -> dict[str, float]:
    """Train all stages of architecture ``arch`` and save the model and processor to ``out``
    (default: the package's weights for it); returns held-out accuracy. The defaults are the
    LLaVA testbed's recipe; ``python -m vispruner.testbed.train`` applies each architecture's own.
    ``language_init="testbed"`` starts the decoder from the bundled LLaVA testbed's (see
    :func:`start_from_testbed_decoder`); None starts it from random weights."""
    if language_init not in (None, "testbed"):
        raise ValueError(f"language_init must be None or 'testbed', got {language_init!r}")
    architecture = ARCHITECTURES[arch]
    out = architecture.weights if out is None else out
    torch.manual_seed(seed)
    start = time.perf_counter()
    model, processor = architecture.build(seed)
    log(f"{arch}: parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    tower = architecture.tower(model)
    if tower_checkpoint is not None and tower_checkpoint.is_file():
        tower.load_state_dict(torch.load(tower_checkpoint, weights_only=True))
        log(f"stage 1 (tower) loaded from {tower_checkpoint}")
    else:
        train_tower(model, architecture, processor, tower_steps, batch, tower_lr, seed, log)
        log(f"stage 1 (tower) took {(time.perf_counter() - start) / 60:.1f} min")
        if tower_checkpoint is not None:
            torch.save(tower.state_dict(), tower_checkpoint)
    tower.requires_grad_(False)
    if language_init == "testbed":
        start_from_testbed_decoder(model, processor, log)
    # The projector is trained in stage 3 from its initial weights (Qwen's merger lives in the tower).
    architecture.projector(model).requires_grad_(True)

    rng = random.Random(seed + 1)
    scenes = [make_scene(rng.randrange(HELD_OUT_LIMIT)) for _ in range(train_scenes)]
    features = image_features(model, architecture, processor, scenes)
    data = (features, scenes, tower_targets(scenes)["patch"])
    val_samples = held_out(val_size, seed=seed + 1)
    val_features = image_features(model, architecture, processor, [s.scene for s in val_samples])
    val = (val_features, [s.question for s in val_samples])
    prior = answer_prior(scenes, random.Random(seed + 2))
    log("answer prior per type: " + " ".join(f"{k} {v:.3f}" for k, v in sorted(prior.items())))
    batcher = QuestionBatcher(processor)

    projector = list(architecture.projector(model).parameters())
    train_language(model, architecture, batcher, data, val, align_steps, language_batch, language_lr, seed + 3, projector, "align", log)
    everything = projector + list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    train_language(model, architecture, batcher, data, val, language_steps, language_batch, language_lr, seed + 4, everything, "tune", log, curriculum)
    accuracy = evaluate_features(model, architecture, batcher, *val)
    minutes = (time.perf_counter() - start) / 60
    log(f"training took {minutes:.1f} min; held-out accuracy " + " ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))

    out.mkdir(parents=True, exist_ok=True)
    architecture.save(model, processor, out)
    return {**accuracy, "minutes": minutes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vispruner.testbed.train", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llava", help="testbed architecture (default: llava)")
    parser.add_argument("--out", type=Path, default=None, help="folder to save to (default: the package's weights for --arch)")
    # Recipe options left out take the architecture's recipe (Architecture.recipe), else train()'s defaults.
    parser.add_argument("--seed", type=int)
    parser.add_argument("--tower-steps", type=int)
    parser.add_argument("--align-steps", type=int)
    parser.add_argument("--language-steps", type=int)
    parser.add_argument("--batch", type=int, help="images per step of stage 1")
    parser.add_argument("--language-batch", type=int, help="questions per step of stages 2 and 3")
    parser.add_argument("--train-scenes", type=int)
    parser.add_argument("--val-size", type=int)
    parser.add_argument("--tower-lr", type=float)
    parser.add_argument("--language-lr", type=float)
    parser.add_argument(
        "--tower-checkpoint", type=Path,
        help="reuse stage 1 from this file if it exists, else save stage 1 there (to tune later stages)",
    )
    parser.add_argument("--curriculum", type=int, help="steps over which short image sequences give way to full ones")
    parser.add_argument(
        "--language-init", choices=("testbed", "none"),
        help="start the decoder from the bundled LLaVA testbed's ('testbed', the Qwen recipe) or from random weights",
    )
    # One thread: on a busy 2-core machine two OpenMP threads stall each other (measured 5x slower).
    parser.add_argument("--threads", type=int, default=1)
    args = vars(parser.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    out, arch = args.pop("out"), args.pop("arch")
    given = {name: value for name, value in args.items() if value is not None}
    if given.get("language_init") == "none":
        given["language_init"] = None
    train(out, arch=arch, **{**ARCHITECTURES[arch].recipe, **given}, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
