"""vLLM engines and the library's transformers path on the same requests, for the plugin's tests.

Import this only after ``pytest.importorskip("vllm")``.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import vispruner
from vispruner.testbed.model import WEIGHTS, save_tower_for_vllm
from vispruner.testbed.scenes import held_out
from tests.tiny_models import random_images, tiny_tokenizer

#: Tiny LLaVA-NeXT: crops of 56 px in 14 px patches (16 per crop), anyres up to 2 x 2 crops.
NEXT_CROP, NEXT_PATCH = 56, 14
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112]]
#: Tiny Qwen3-VL: 8 px patches, so 16 px merged tokens.
QWEN3_PATCH = 8
#: Tiny LLaVA-OneVision: SigLIP crops of 28 px in 4 px patches (7 x 7 per crop, odd like SigLIP's
#: 27 x 27), anyres up to 4 x 4 crops: grids of more than 9 x 1.1^2 crops' worth are downsampled.
OV_CROP, OV_PATCH = 28, 4
OV_PINPOINTS = [[OV_CROP * i, OV_CROP * j] for i in range(1, 5) for j in range(1, 5)]


@dataclass
class Request:
    prompt: str
    images: list[Image.Image]
    #: (frames, height, width, 3) uint8 arrays, for ``<video>`` markers.
    videos: list[Any] = field(default_factory=list)


@dataclass
class Result:
    tokens: list[int]
    logprobs: list[float]
    prompt_length: int
    #: Per image, the kept patch indices of each crop.
    kept: list[list[list[int]]] = field(default_factory=list)


def scene_requests(count: int, start: int = 0) -> list[Request]:
    """Held-out testbed questions (prompts of different lengths), one image each."""
    samples = held_out(start + count)[start:]
    return [Request(f"USER: {s.question.text} <image> ASSISTANT:", [s.scene.render()]) for s in samples]


def save_tiny_next(path: Path, seed: int = 0) -> Path:
    """A random tiny LLaVA-NeXT saved as vLLM and transformers load it (language head size 32, which
    vLLM's CPU attention supports; the library's own tiny models use 8)."""
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=NEXT_CROP, patch_size=NEXT_PATCH, projection_dim=32, initializer_factor=4.0,
        ),
        text_config=LlamaConfig(
            vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2,
        ),
        image_token_id=4, vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0,
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.save_pretrained(path)
    save_tower_for_vllm(path)
    images = LlavaNextImageProcessorPil(
        size={"shortest_edge": NEXT_CROP}, crop_size={"height": NEXT_CROP, "width": NEXT_CROP}, image_grid_pinpoints=NEXT_PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=images, tokenizer=tiny_tokenizer(), patch_size=NEXT_PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


def save_tiny_onevision(path: Path, seed: int = 0) -> Path:
    """A random tiny LLaVA-OneVision (SigLIP tower, its last layer, no [CLS]; anyres_max_9; Qwen2 language
    model with head size 32, which vLLM's CPU attention supports) with an image and a video processor,
    saved as vLLM and transformers load it.

    The tower's MLPs use the exact GELU: with SigLIP's tanh GELU, vLLM's CPU kernel and torch's
    give features about 1e-5 apart, which on this random model reorders the near-tied received
    attention that VisPruner's diverse step lists its tokens by (measured on this model: 1 or 2 of 8
    images chose otherwise at each of three budgets), while every other method chose alike."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers import Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from tests.tiny_models import VOCAB

    vocab = [*VOCAB, "<video>"]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=OV_CROP,
            patch_size=OV_PATCH, hidden_act="gelu",
        ),
        text_config=Qwen2Config(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2,
        ),
        image_token_index=4, video_token_index=len(VOCAB), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio="anyres_max_9",
    )
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(config).save_pretrained(path)
    save_tower_for_vllm(path)
    size = {"height": OV_CROP, "width": OV_CROP}
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=OV_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tiny_tokenizer(vocab, video_token="<video>"),
        num_image_tokens=(OV_CROP // OV_PATCH) ** 2, vision_feature_select_strategy="full",
    ).save_pretrained(path)
    return path


def save_qwen_testbed(path: Path) -> Path:
    """The bundled Qwen2.5-VL testbed with its image processor letting sizes from 56 x 56 to 140 x 140 px
    through (the shipped one resizes every image to 112 x 112 px), so that images of different sizes
    reach the tower with grids of their own."""
    from vispruner.testbed import qwen

    shutil.copytree(qwen.WEIGHTS, path, dirs_exist_ok=True)
    config = json.loads((path / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 56 * 56, "longest_edge": 140 * 140}
    (path / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return path


def load_qwen_reference(path: Path) -> tuple[Any, Any]:
    from vispruner.testbed import qwen

    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, qwen.load_processor(path)


def save_tiny_qwen3_vl(path: Path, seed: int = 0) -> Path:
    """A random tiny Qwen3-VL (deepstack features from both vision blocks; 8 px patches, merged 2 x 2
    into 16 px tokens; language head size 32, which vLLM's CPU attention supports) with the testbed
    tokenizer and a Qwen3-VL processor, saved as vLLM and transformers load it."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from vispruner.testbed import qwen
    from vispruner.testbed.model import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL, build_tokenizer

    tokenizer = build_tokenizer(
        special=(*SPECIAL, qwen.VIDEO_TOKEN, "<vision_start>", "<vision_end>"),
        named={"image_token": IMAGE_TOKEN, "video_token": qwen.VIDEO_TOKEN},
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", IMAGE_TOKEN), ("video_token_id", qwen.VIDEO_TOKEN),
        ("vision_start_token_id", "<vision_start>"), ("vision_end_token_id", "<vision_end>"))}
    config = Qwen3VLConfig(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN3_PATCH, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1], initializer_range=0.2,
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=512, initializer_range=0.2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True},
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        **ids,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    sizes = dict(patch_size=QWEN3_PATCH, merge_size=2, temporal_patch_size=2)
    Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(**sizes, size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128}),
        tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)
    return path


def next_requests(sizes: list[list[tuple[int, int]]], seed: int = 0) -> list[Request]:
    """Prompts of different lengths over the tiny vocabulary, with images of the given (h, w)."""
    requests = []
    for index, image_sizes in enumerate(sizes):
        words = " ".join(f"w{5 + (index * 7 + j) % 40}" for j in range(2 + index % 3))
        tags = " ".join("<image>" for _ in image_sizes)
        requests.append(Request(f"{words} {tags} w{6 + index}", random_images(image_sizes, seed + index)))
    return requests


@contextmanager
def engine(model: Path | str = WEIGHTS, vispruner_options: dict | None = None, **kwargs: Any) -> Iterator[Any]:
    from vllm import LLM

    options = dict(
        model=str(model), dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
        limit_mm_per_prompt={"image": 3}, max_num_seqs=8,
    )
    options.update(kwargs)
    if vispruner_options is not None:
        options["hf_overrides"] = {"vispruner": vispruner_options}
    llm = LLM(**options)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


def vllm_results(llm: Any, requests: list[Request], max_tokens: int = 4) -> list[Result]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1)  # stops at EOS, as generate() does
    prompts = [{"prompt": r.prompt, "multi_modal_data": _media(r)} for r in requests]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    results = []
    for output in outputs:
        done = output.outputs[0]
        logprobs = [step[token].logprob for step, token in zip(done.logprobs, done.token_ids)]
        results.append(Result(list(done.token_ids), logprobs, len(output.prompt_token_ids)))
    return results


def _media(request: Request) -> dict[str, Any]:
    media = {"image": request.images, "video": request.videos}
    return {name: items if len(items) > 1 else items[0] for name, items in media.items() if items}


def vllm_kept(llm: Any) -> list[list[list[int]]]:
    """Per image of the engine's last pruned vision call, the kept patch indices of each crop."""
    (last,) = llm.apply_model(lambda model: [[row.tolist() for row in s.indices] for s in model.vispruner_last])
    return last


def load_reference(path: Path | str = WEIGHTS) -> tuple[Any, Any]:
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(path, local_files_only=True)


def library_results(model: Any, processor: Any, requests: list[Request], options: dict | None, max_tokens: int = 4) -> list[Result]:
    """The library's transformers path, one request at a time, greedy, with raw log-probs."""
    if options is None:
        vispruner.remove(model)
    else:
        vispruner.apply(model, **options)
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=max_tokens, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True, num_beams=1)
    results = []
    for request in requests:
        media = {"images": request.images or None, "videos": request.videos or None}
        inputs = processor(**media, text=[request.prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=config)
        new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, new)]
        if options is None:
            length, kept = inputs["input_ids"].shape[1], []
        else:
            pruner = vars(model)["_vispruner"]
            length = int(pruner.last_tokens.sum())
            kept = [[row.tolist() for row in s.indices] for s in vispruner.last_selection(model)]
        results.append(Result(new, logprobs, length, kept))
    vispruner.remove(model)
    return results


def assert_same(got: list[Result], want: list[Result], tolerance: float = 1e-4) -> None:
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.prompt_length == w.prompt_length, (index, g.prompt_length, w.prompt_length)
        assert g.tokens == w.tokens, (index, g.tokens, w.tokens)
        gap = max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs, strict=True))
        assert gap <= tolerance, (index, gap, g.logprobs, w.logprobs)


def dump(results: list[Result]) -> str:
    return json.dumps([r.__dict__ for r in results])


#: Tiny Gemma 3: 64 px images in 4 px patches (16 x 16), pooled 4 x 4 into 16 tokens per image.
GEMMA_TOKENS = 16


def save_tiny_gemma3(path: Path, seed: int = 1, sliding_window: int = 16) -> Path:
    """A random tiny Gemma 3 (SigLIP tower, 16 pooled tokens per image; a sliding-window and a global
    layer with head size 32, which vLLM's CPU attention supports) with a word-level tokenizer that
    has Gemma 3's image markers and the newline tokens vLLM's Gemma 3 processor looks up, saved as
    vLLM and transformers load it. Its output head is its own: with the (scaled) input embeddings
    tied to it, the tiny model only repeats the prompt's last token."""
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from tests.tiny_models import BOI, EOI, SIGLIP_VOCAB, SOFT

    tokenizer = tiny_tokenizer([*SIGLIP_VOCAB, " "], image_token=SOFT, boi_token=BOI, eoi_token=EOI)
    # Spaces are tokens, as in Gemma's own tokenizer: pan-and-scan's "<eoi>\n\n \n\n<boi>" keeps
    # its space, where vLLM would otherwise merge the two newline tokens into one.
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    tokenizer.add_tokens([AddedToken("\n" * n, normalized=False) for n in range(1, 5)])
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (BOI, EOI, SOFT)}
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=4,
        ),
        text_config=Gemma3TextConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=sliding_window,
            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            initializer_range=0.2, tie_word_embeddings=False,
        ),
        tie_word_embeddings=False,
        mm_tokens_per_image=GEMMA_TOKENS, boi_token_index=ids[BOI], eoi_token_index=ids[EOI], image_token_index=ids[SOFT],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    # Gemma 3 initialises the projection to zeros (all image tokens equal); random weights make pruning matter.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    save_tower_for_vllm(path)
    images = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=GEMMA_TOKENS).save_pretrained(path)
    return path
