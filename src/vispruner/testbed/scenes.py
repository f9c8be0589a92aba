"""Synthetic scenes of coloured shapes and one-word questions about them, deterministic per seed.

Each scene holds 2 to 5 objects, each a unique (colour, shape) pair, some small (a single 14 px
patch or less) and many away from the centre, on a background drawn from a set of muted tones
with a soft gradient and noise. Questions ask for a colour, a shape, a count, presence (half of
them about absent objects, some of those "adversarial": right colour, wrong shape, as in POPE)
or a side, and every answer is one word.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((90, 90, 90), (60, 70, 80), (110, 100, 85), (70, 85, 70), (40, 40, 50), (120, 115, 125))
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("colour", "shape", "count", "presence", "side")
#: Object sizes in pixels (bounding-box side): the small ones fit inside one 14 px patch, and none
#: is so large that its inner patches are plain colour, which would say nothing of its shape.
SIZES = (10, 12, 14, 16, 20)
MAX_OBJECTS = 5
SIDE_MARGIN = 6


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    x: float  # centre, pixels
    y: float
    size: int


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    kind: str
    #: (colour, shape) of the objects the answer depends on (none for an absent object).
    about: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: tuple[int, int, int]
    seed: int

    def render(self) -> Image.Image:
        """The scene as a 112 x 112 RGB image."""
        rng = np.random.default_rng(self.seed)
        base = np.array(self.background, dtype=np.float32)
        ramp = np.linspace(-18, 18, IMAGE_SIZE, dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        gradient = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
        noise = rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        pixels = np.clip(base + gradient[..., None] + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            half = obj.size / 2
            box = (obj.x - half, obj.y - half, obj.x + half, obj.y + half)
            fill = COLOURS[obj.colour]
            if obj.shape == "circle":
                draw.ellipse(box, fill=fill)
            elif obj.shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(obj.x, obj.y - half), (obj.x + half, obj.y + half), (obj.x - half, obj.y + half)], fill=fill)
        return image


def make_scene(seed: int) -> Scene:
    """The scene of ``seed``: the same seed gives the same scene on every machine."""
    rng = random.Random(seed)
    count = rng.randint(2, MAX_OBJECTS)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    objects: list[Shape] = []
    for colour, shape in kinds:
        for _ in range(100):  # rejection sampling: objects must not overlap
            size = rng.choice(SIZES)
            half = size / 2
            x = rng.uniform(half + 1, IMAGE_SIZE - half - 1)
            y = rng.uniform(half + 1, IMAGE_SIZE - half - 1)
            if all(abs(x - o.x) > half + o.size / 2 + 2 or abs(y - o.y) > half + o.size / 2 + 2 for o in objects):
                objects.append(Shape(colour, shape, round(x, 1), round(y, 1), size))
                break
    return Scene(tuple(objects), rng.choice(BACKGROUNDS), seed)


def _pairs(objects: list[Shape] | tuple[Shape, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((o.colour, o.shape) for o in objects)


def _plural(shape: str) -> str:
    return shape + "s"


def ask(scene: Scene, kind: str, rng: random.Random) -> Question:
    """One question of ``kind`` (one of :data:`QUESTION_TYPES`) about ``scene``, with its answer."""
    objs = scene.objects
    by_shape = {s: [o for o in objs if o.shape == s] for s in SHAPES}
    by_colour = {c: [o for o in objs if o.colour == c] for c in COLOURS}
    if kind == "colour":
        unique = [s for s in SHAPES if len(by_shape[s]) == 1]
        if unique:
            shape = rng.choice(unique)
            return Question(f"what color is the {shape} ?", by_shape[shape][0].colour, kind, _pairs(by_shape[shape]))
        kind = "shape"
    if kind == "shape":
        unique = [c for c in COLOURS if len(by_colour[c]) == 1]
        colour = rng.choice(unique) if unique else None
        if colour is None:  # unreachable with <= 5 objects and 3 shapes, but stay total
            return ask(scene, "count", rng)
        return Question(f"what shape is the {colour} object ?", by_colour[colour][0].shape, kind, _pairs(by_colour[colour]))
    if kind == "count":
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            return Question(f"how many {_plural(shape)} are there ?", NUMBERS[len(by_shape[shape])], kind, _pairs(by_shape[shape]))
        return Question("how many objects are there ?", NUMBERS[len(objs)], kind, _pairs(objs))
    if kind == "presence":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
            return Question(f"is there a {colour} {shape} ?", "yes", kind, ((colour, shape),))
        absent = sorted({(c, s) for c in COLOURS for s in SHAPES} - present)
        adversarial = [k for k in absent if k[0] in by_colour and by_colour[k[0]]]
        colour, shape = rng.choice(adversarial if adversarial and rng.random() < 0.5 else absent)
        return Question(f"is there a {colour} {shape} ?", "no", kind)
    if kind == "side":
        # Objects within SIDE_MARGIN px of the midline would make the answer a coin toss.
        horizontal = rng.random() < 0.5
        axis = [o for o in objs if abs((o.x if horizontal else o.y) - IMAGE_SIZE / 2) >= SIDE_MARGIN]
        if not axis:
            return ask(scene, "presence", rng)
        obj = rng.choice(axis)
        if horizontal:
            answer = "left" if obj.x < IMAGE_SIZE / 2 else "right"
            return Question(f"is the {obj.colour} {obj.shape} on the left or the right ?", answer, kind, _pairs([obj]))
        answer = "top" if obj.y < IMAGE_SIZE / 2 else "bottom"
        return Question(f"is the {obj.colour} {obj.shape} at the top or the bottom ?", answer, kind, _pairs([obj]))
    raise ValueError(f"kind must be one of {QUESTION_TYPES}, got {kind!r}")


@dataclass(frozen=True)
class Sample:
    scene: Scene
    question: Question


def make_sample(seed: int, kind: str | None = None) -> Sample:
    """Scene ``seed`` with one question (of ``kind``, or of a kind drawn from the seed)."""
    scene = make_scene(seed)
    rng = random.Random(seed * 7919 + 1)
    return Sample(scene, ask(scene, kind or rng.choice(QUESTION_TYPES), rng))


#: Seeds at or above this are held out from training.
HELD_OUT_START = 10_000_000


def held_out(n: int, seed: int = 0) -> list[Sample]:
    """``n`` held-out samples (scene seeds never used in training), the same for the same ``seed``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    start = HELD_OUT_START + seed * 1_000_003
    return [make_sample(start + i) for i in range(n)]


def vocabulary() -> list[str]:
    """Every word a question or an answer can use."""
    words = set(COLOURS) | set(SHAPES) | {_plural(s) for s in SHAPES} | set(NUMBERS)
    words |= {"yes", "no", "left", "right", "top", "bottom", "?", "object", "objects"}
    words |= set("what color is the shape how many are there a on left or right at top bottom".split())
    return sorted(words)
