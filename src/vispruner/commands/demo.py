"""``vispruner demo``: one question answered with all visual tokens and with VisPruner, plus a picture."""

from __future__ import annotations

import argparse

#: Held-out scene and question of the default demo: a 10 px square in a corner decides the answer.
DEMO_SCENE = 129


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="testbed", help="'testbed' (bundled, offline) or a model path or hub id")
    parser.add_argument("--image", default=None, help="image file (default: a generated testbed scene)")
    parser.add_argument("--question", default=None, help="question about the image (required with --image)")
    parser.add_argument(
        "--tokens", default="11%", help="visual tokens VisPruner keeps per image: a count (16) or a share (11%%)"
    )
    parser.add_argument("--important-ratio", type=float, default=0.5, help="share of kept tokens chosen by [CLS] attention")
    parser.add_argument("--method", default="vispruner", help="registered method to compare with all tokens")
    parser.add_argument("--out", default="vispruner_demo.png", help="picture of the kept patches (PNG)")


def run(args: argparse.Namespace) -> int:
    import time

    from PIL import Image
    from transformers.utils import logging

    import vispruner
    from vispruner.eval.answering import answer
    from vispruner.eval.budgets import parse_budget, visual_tokens
    from vispruner.methods import get_method
    from vispruner.testbed.model import encode, load_model
    from vispruner.testbed.scenes import HELD_OUT_START, make_sample
    from vispruner.viz import draw_selection, pixel_values_to_image

    if args.image is not None and args.question is None:
        raise ValueError("question must be given with --image (the default question is about the generated scene)")
    # The demo's output is the comparison: no loading bars, no notes about optional backends.
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    model, processor = load_model(args.model)
    if args.image is None:
        sample = make_sample(HELD_OUT_START + DEMO_SCENE)
        image, question, expected = sample.scene.render(), args.question or sample.question.text, sample.question.answer
        if args.question is not None:
            expected = None
    else:
        image, question, expected = Image.open(args.image).convert("RGB"), args.question, None
    total = visual_tokens(model)
    budget = parse_budget(args.tokens, total)

    answer(model, processor, [image], [question])  # warm-up, so that the timings compare like with like
    rows = []
    start = time.perf_counter()
    rows.append(("all tokens", total, answer(model, processor, [image], [question])[0], time.perf_counter() - start))
    options = {"important_ratio": args.important_ratio} if "important_ratio" in get_method(args.method).options else {}
    with vispruner.pruned(model, num_tokens=budget.num_tokens, method=args.method, **options):
        start = time.perf_counter()
        reply = answer(model, processor, [image], [question])[0]
        rows.append((args.method, budget.num_tokens, reply, time.perf_counter() - start))
        selection = vispruner.last_selection(model)[0]

    print(f"model:    {args.model}")
    print(f"question: {question}" + (f"  (right answer: {expected})" if expected else ""))
    for label, tokens, reply, seconds in rows:
        print(f"{label:>12s}: {reply!r:12s} {tokens:4d} visual tokens  {1000 * seconds:7.1f} ms")

    pixel_values = encode(processor, [image], [question])["pixel_values"][0]
    seen = pixel_values_to_image(pixel_values, processor.image_processor.image_mean, processor.image_processor.image_std)
    important = None if selection.important is None else selection.important[0]
    draw_selection(seen, selection.keep[0], important, grid=selection.grid).save(args.out)
    print(f"kept patches drawn in {args.out}")
    return 0
