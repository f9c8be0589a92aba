"""``vispruner demo``: one question answered with all visual tokens and with VisPruner, plus a picture."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .arguments import UsageError, add_method_options, budgets, check_model, check_output, method_name, method_options

if TYPE_CHECKING:
    from PIL import Image

#: Held-out scene and question of the default demo: a 10 px square in a corner decides the answer.
DEMO_SCENE = 129


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="testbed", help="'testbed' or 'testbed-qwen' (bundled, offline) or a model path or hub id")
    parser.add_argument("--image", default=None, help="image file (default: a generated testbed scene)")
    parser.add_argument("--question", default=None, help="question about the image (required with --image)")
    parser.add_argument(
        "--tokens", default="11%",
        help="visual tokens the method keeps per image: a count (16) or a share (11%%, passed as keep_ratio: "
        "that share of each image, rounded half up)",
    )
    parser.add_argument("--method", type=method_name, default="vispruner",
                        help="registered method to compare with all tokens (default vispruner)")
    add_method_options(parser)
    parser.add_argument("--out", default="vispruner_demo.png", help="picture of the kept patches (PNG)")


def _open_image(path: str) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"--image: no such file {path!r}") from None
    except (OSError, UnidentifiedImageError) as error:
        raise UsageError(f"--image: cannot read {path!r} as an image ({error})") from None


def _check_picture_path(path: str) -> None:
    from PIL import Image

    check_output(path, "--out")
    extension = path[path.rfind(".") :].lower() if "." in path else ""
    if extension not in Image.registered_extensions():
        raise UsageError(f"--out: {path!r} needs an image extension such as .png")


def run(args: argparse.Namespace) -> int:
    if args.image is not None and args.question is None:
        raise UsageError("--question must be given with --image (the default question is about the generated scene)")
    image = None if args.image is None else _open_image(args.image)
    options = method_options(args, [args.method]).per_method[args.method]
    _check_picture_path(args.out)
    total = check_model(args.model, {args.method: options})
    chosen = budgets(args.tokens, total)
    if len(chosen) != 1:
        raise UsageError(f"--tokens takes one budget; got {args.tokens!r}")
    budget = chosen[0]

    import time

    from transformers.utils import logging

    import vispruner
    from vispruner.eval.answering import answer
    from vispruner.testbed.model import load_model
    from vispruner.testbed.scenes import HELD_OUT_START, make_sample
    from vispruner.viz import draw_selection

    # The demo's output is the comparison: no loading bars, no notes about optional backends.
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    model, processor = load_model(args.model)
    question, expected = args.question, None
    if image is None:
        sample = make_sample(HELD_OUT_START + DEMO_SCENE)
        image = sample.scene.render()
        if question is None:
            question, expected = sample.question.text, sample.question.answer

    answer(model, processor, [image], [question])  # warm-up, so that the timings compare like with like
    rows = []
    start = time.perf_counter()
    rows.append(("all tokens", total, answer(model, processor, [image], [question])[0], time.perf_counter() - start))
    with vispruner.pruned(model, method=args.method, **budget.apply_arguments(), **options):
        answer(model, processor, [image], [question])  # the pruned path's own warm-up (hooks, method import)
        start = time.perf_counter()
        reply = answer(model, processor, [image], [question])[0]
        rows.append((args.method, budget.num_tokens, reply, time.perf_counter() - start))
        selection = vispruner.last_selection(model)[0]

    print(f"model:    {args.model}")
    print(f"question: {question}" + (f"  (right answer: {expected})" if expected else ""))
    for label, tokens, reply, seconds in rows:
        print(f"{label:>12s}: {reply!r:12s} {tokens:4d} visual tokens  {1000 * seconds:7.1f} ms")

    important = None if selection.important is None else selection.important[0]
    title = [f"Q: {question}" + (f" (right answer: {expected})" if expected else "")]
    title += [f"{label}, {tokens} tokens: {reply or '(no answer)'}" for label, tokens, reply, _ in rows]
    picture = draw_selection(image, selection.keep[0], important, grid=selection.grid, title=title, processor=processor)
    picture.save(args.out)
    print(f"kept patches drawn in {args.out}")
    return 0
