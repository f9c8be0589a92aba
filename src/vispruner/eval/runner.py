"""Accuracy of each method at each budget on held-out testbed questions, batched."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from vispruner.testbed.scenes import Question, Sample

from .answering import answer
from .budgets import Budget


@dataclass(frozen=True)
class Row:
    method: str
    budget: str  # as given
    num_tokens: int
    fraction: float
    accuracy: float
    retained: float | None  # accuracy / full-token accuracy (None when that is 0)
    by_type: dict[str, float] = field(default_factory=dict)  # accuracy per :func:`question_type`

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The question types of :func:`question_type`, in the order reports show them.
QUESTION_TYPES = ("colour", "shape", "count", "presence", "left/right", "top/bottom")


def question_type(question: Question) -> str:
    """The question's kind, with side questions split by axis ("left/right", "top/bottom"):
    the axes differ in how the model can tell them, so they are reported apart."""
    if question.kind == "side":
        return "left/right" if question.answer in ("left", "right") else "top/bottom"
    return question.kind


@dataclass(frozen=True)
class Score:
    """Share answered right, overall and per :func:`question_type` (the types asked, in report order)."""

    accuracy: float
    by_type: dict[str, float]


def accuracy(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    batch_size: int,
    step: Callable[[int], None],
    max_new_tokens: int = 1,
) -> Score:
    """How many of ``samples`` are answered right (first word of the reply); calls ``step(k)``
    after each batch of k."""
    right: Counter[str] = Counter()
    asked: Counter[str] = Counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images, questions = [s.scene.render() for s in chunk], [s.question.text for s in chunk]
        replies = answer(model, processor, images, questions, max_new_tokens)
        for reply, sample in zip(replies, chunk):
            kind = question_type(sample.question)
            asked[kind] += 1
            right[kind] += reply == sample.question.answer
        step(len(chunk))
    kinds = sorted(asked, key=QUESTION_TYPES.index)
    return Score(sum(right.values()) / len(samples), {kind: right[kind] / asked[kind] for kind in kinds})


def evaluate(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    methods: Sequence[str],
    budgets: Sequence[Budget],
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    max_new_tokens: int = 1,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Score, list[Row]]:
    """Full-token accuracy and one :class:`Row` per (method, budget), in that order.

    ``options[method]`` are that method's options (none when absent). A budget that keeps every
    visual token (100%) is the unpruned model for every method (each reproduces the unpatched
    model then), so its rows take the full-token accuracy from the one unpruned run. ``torch``
    is reseeded with ``seed`` before every run, so random baselines repeat exactly.
    """
    import torch
    from tqdm.auto import tqdm

    import vispruner

    options = options or {}
    pruning = [budget for budget in budgets if budget.fraction < 1]
    runs = 1 + len(methods) * len(pruning)
    # One tick per question answered: ``runs`` passes over the same questions.
    description = f"eval, {runs} run{'s' if runs > 1 else ''} x {len(samples)} questions"
    with tqdm(total=runs * len(samples), desc=description, unit="answer", disable=not progress) as bar:
        bar.set_postfix_str("all tokens")
        torch.manual_seed(seed)
        full = accuracy(model, processor, samples, batch_size, bar.update, max_new_tokens)
        rows = []
        for method in methods:
            for budget in budgets:
                if budget in pruning:
                    bar.set_postfix_str(f"{method} {budget.given}")
                    torch.manual_seed(seed)
                    with vispruner.pruned(
                        model, method=method, **budget.apply_arguments(), **options.get(method, {})
                    ):
                        score = accuracy(model, processor, samples, batch_size, bar.update, max_new_tokens)
                else:
                    score = full
                retained = score.accuracy / full.accuracy if full.accuracy else None
                rows.append(
                    Row(method, budget.given, budget.num_tokens, budget.fraction, score.accuracy, retained, score.by_type)
                )
    return full, rows


def plot(rows: Sequence[Row], full: float, path: str, title: str = "") -> None:
    """Accuracy against the share of visual tokens kept, one line per method, saved to ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot needs matplotlib: pip install 'vispruner[plot]'") from error

    figure, axes = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r.method for r in rows):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.fraction)
        axes.plot([100 * r.fraction for r in mine], [100 * r.accuracy for r in mine], marker="o", label=method)
    axes.axhline(100 * full, color="grey", linestyle="--", label="all tokens")
    axes.set_xscale("log")
    axes.set_xlabel("visual tokens kept (%)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
