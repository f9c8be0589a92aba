"""vLLM throughput with and without vispruner's plugin, on the same requests, in one run.

Builds a preset as ``vispruner bench`` does (published architecture, random weights, the
language model cut to its first ``--layers`` decoder layers), saves it where vLLM loads it (a
word-level tokenizer; LLaVA: the tower keys in the llava-hf layout and CLIP's image processor at
the tower's size; Qwen2.5-VL: Qwen's image processor holding every image at ``--image-size`` px
square, and the vocabulary cut to 1024 rows, which only the embedding lookup and the last token's
logits read, to keep the float32 model within a CPU machine's memory), then serves the same requests (one image and a short question each, prefill
only: one new token) with an unpruned engine and a pruned one, one after the other in this
process, a warm-up pass then ``--repeats`` timed passes each (every pass its own scenes, prefix
caching off, so that no cache serves a timed request). Reports requests/s and prefill
tokens/s of each, the pruned/unpruned throughput ratio, and the ratio of prefill FLOPs
(vision tower and projector, the same on both sides, plus the language model's prefill on each
prompt length).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=4 python benchmarks/vllm_throughput.py \\
        [--preset llava-1.5-7b --layers 2 --requests 4 --num-tokens 64 --method vispruner --repeats 2]
    ... --preset qwen2.5-vl-7b --image-size 336 --num-tokens 36

Needs vLLM (a GPU build, or vllm-cpu on a CPU-only machine; see docs/serving.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")


#: Vocabulary rows the Qwen preset keeps (see the module doc).
QWEN_VOCABULARY = 1024


def is_qwen(preset: str) -> bool:
    return preset.startswith("qwen2.5-vl")


def save_preset(name: str, layers: int, out: Path, image_size: int) -> dict[str, Any]:
    """The preset saved for vLLM; returns its config summary for the report."""
    import torch

    from vispruner.bench.presets import build_preset

    if is_qwen(name):
        return _save_qwen(name, layers, out, image_size)
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vispruner.testbed.model import CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD, build_tokenizer, save_tower_for_vllm

    model, full = build_preset(name, layers=layers, dtype=torch.float32)
    tokenizer = build_tokenizer()
    model.config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    model.config.text_config.max_position_embeddings = 2048
    model.save_pretrained(out)
    save_tower_for_vllm(out)
    vision = model.config.vision_config
    side = vision.image_size
    LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=CLIP_MEAN, image_std=CLIP_STD
        ),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    vision_flops = _vision_flops(model)
    summary = {"preset": name, "llm_layers": layers, "llm_layers_full": full, "vision_flops_per_image": vision_flops,
               "text_config": model.config.text_config}
    del model
    gc.collect()
    return summary


def _save_qwen(name: str, layers: int, out: Path, image_size: int) -> dict[str, Any]:
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vispruner.bench.presets import build_preset
    from vispruner.testbed import qwen
    from vispruner.testbed.model import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL, build_tokenizer

    model, full = build_preset(name, layers=layers, dtype=torch.float32, vocab_size=QWEN_VOCABULARY)
    tokenizer = build_tokenizer(special=(*SPECIAL, qwen.VIDEO_TOKEN), named={"image_token": IMAGE_TOKEN, "video_token": qwen.VIDEO_TOKEN})
    model.config.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    model.config.video_token_id = tokenizer.convert_tokens_to_ids(qwen.VIDEO_TOKEN)
    model.save_pretrained(out)
    vision = model.config.vision_config
    pixels = image_size * image_size
    images = Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
        size={"shortest_edge": pixels, "longest_edge": pixels},
    )
    qwen.save_processor(qwen.assemble_processor(images, tokenizer, CHAT_TEMPLATE), out)
    side = image_size // vision.patch_size
    grid = torch.tensor([[1, side, side]])
    patch = 3 * vision.temporal_patch_size * vision.patch_size**2
    vision_flops = _flops(lambda: model.model.get_image_features(torch.zeros(side * side, patch), grid))
    summary = {"preset": name, "llm_layers": layers, "llm_layers_full": full, "vision_flops_per_image": vision_flops,
               "image_size": image_size, "text_config": model.config.text_config}
    del model
    gc.collect()
    return summary


def _vision_flops(model: Any) -> int:
    """FLOPs of the vision tower (up to the feature layer) and projector for one image."""
    import torch

    side = model.config.vision_config.image_size
    return _flops(lambda: model.model.get_image_features(pixel_values=torch.zeros(1, 3, side, side)))


def _flops(run: Any) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


def requests(count: int, side: int) -> list[dict[str, Any]]:
    from vispruner.testbed.scenes import held_out

    return [
        {"prompt": f"USER: {s.question.text} <image> ASSISTANT:", "multi_modal_data": {"image": s.scene.render().resize((side, side))}}
        for s in held_out(count)
    ]


def measure(path: Path, overrides: dict | None, passes: list[list[dict]]) -> dict[str, Any]:
    """A warm-up pass, then each timed pass: its own scenes, so that no cache (prefix, encoder,
    processor) holds anything of it."""
    from vllm import LLM, SamplingParams

    kwargs = {"hf_overrides": {"vispruner": overrides}} if overrides else {}
    size = len(passes[0])
    llm = LLM(model=str(path), dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              max_num_seqs=size, max_num_batched_tokens=max(2048, 700 * size), enable_prefix_caching=False,
              limit_mm_per_prompt={"image": 1}, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(passes[0], params, use_tqdm=False)
    times, lengths = [], []
    for prompts in passes[1:]:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
        lengths += [len(o.prompt_token_ids) for o in outputs]
    del llm
    gc.collect()
    seconds = sum(times)
    return {"prompt_tokens": lengths, "seconds_per_pass": times,
            "requests_per_s": len(lengths) / seconds, "prefill_tokens_per_s": sum(lengths) / seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llava-1.5-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--num-tokens", type=int, default=64)
    parser.add_argument("--method", default="vispruner")
    parser.add_argument("--image-size", type=int, default=336, help="Qwen2.5-VL: image side in px (LLaVA: the tower's)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    from vispruner.bench.flops import llm_prefill_flops
    from vispruner.vllm.settings import settings_for  # checks the options before the long build

    class _Config:
        model_type = "qwen2_5_vl" if is_qwen(args.preset) else "llava"
        vision_config = type("V", (), {"model_type": "clip_vision_model"})()
        vision_feature_layer, vision_feature_select_strategy = -2, "default"
        vispruner = {"method": args.method, "num_tokens": args.num_tokens}

    settings_for(_Config())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder)
        summary = save_preset(args.preset, args.layers, path, args.image_size)
        from transformers import AutoConfig

        side = args.image_size if is_qwen(args.preset) else AutoConfig.from_pretrained(path).vision_config.image_size
        prompts = requests(args.requests * (args.repeats + 1), side)
        passes = [prompts[i : i + args.requests] for i in range(0, len(prompts), args.requests)]
        full = measure(path, None, passes)
        pruned = measure(path, {"method": args.method, "num_tokens": args.num_tokens}, passes)
    text = summary.pop("text_config")

    def flops(lengths: list[int]) -> int:
        return sum(llm_prefill_flops(text, [n] * text.num_hidden_layers) + summary["vision_flops_per_image"] for n in lengths)

    flops_ratio = flops(full["prompt_tokens"]) / flops(pruned["prompt_tokens"])
    speedup = pruned["requests_per_s"] / full["requests_per_s"]
    report = {**summary, "method": args.method, "num_tokens": args.num_tokens, "requests": args.requests,
              "unpruned": full, "pruned": pruned, "throughput_ratio": speedup, "prefill_flops_ratio": flops_ratio,
              "share_of_flops_ratio": speedup / flops_ratio}
    print(f"| engine | prompt tokens | requests/s | prefill tokens/s |")
    print(f"| --- | ---: | ---: | ---: |")
    for name, row in (("unpruned", full), (f"{args.method} {args.num_tokens}", pruned)):
        print(f"| {name} | {statistics.mean(row['prompt_tokens']):.0f} | {row['requests_per_s']:.3f} | {row['prefill_tokens_per_s']:.1f} |")
    print(f"throughput ratio {speedup:.2f}x, prefill FLOPs ratio {flops_ratio:.2f}x, share {speedup / flops_ratio:.0%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
