"""The testbed VLM: a small stock ``LlavaForConditionalGeneration`` with an offline processor.

The vision tower is a CLIP tower ([CLS] + 8 x 8 patches of 14 px on 112 px images), the language
model a LLaMA decoder, the projector LLaVA-1.5's two-layer MLP. The tokenizer is a word-level
``tokenizers`` vocabulary over :func:`vispruner.testbed.scenes.vocabulary`, so building and loading
need no network. The chat template puts the question before the image so that a model this small
can read the image with the question already in view.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .scenes import IMAGE_SIZE, vocabulary

if TYPE_CHECKING:
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

WEIGHTS = Path(__file__).parent / "weights"
PATCH_SIZE = 14
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGE_TOKEN = "<image>"
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {{ message['content'][0]['text'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# CLIP's normalisation constants, so that the processor is a stock CLIPImageProcessor.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def build_tokenizer(special: tuple[str, ...] = SPECIAL, named: dict[str, str] | None = None) -> Any:
    """A word-level fast tokenizer over the question vocabulary (lower-cases, splits punctuation),
    with the ``special`` tokens first (``<pad>``, ``<s>``, ``</s>``, ``<unk>``, then placeholders).

    ``named``: the placeholders a processor finds by attribute (default ``image_token`` only);
    saved in ``tokenizer_config.json``, where vLLM's processors look for them too."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [*special, "user", "assistant", ":", *vocabulary()]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    core.add_special_tokens(list(special))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named or {"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=256,
    )


def build_processor() -> LlavaProcessor:
    """The stock ``LlavaProcessor`` (``CLIPImageProcessor`` + the word-level tokenizer)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_model(processor: LlavaProcessor, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised testbed model (about 1.4 M parameters) for ``processor``'s vocabulary."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=96,
        intermediate_size=288,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=96,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=NUM_PATCHES,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


#: Names of the bundled testbeds, as ``--model`` takes them, and their architectures
#: (:data:`vispruner.testbed.architectures.ARCHITECTURES`, ``train.py --arch``).
TESTBEDS = {"testbed": "llava", "testbed-qwen": "qwen"}


def save_tower_for_vllm(path: Path) -> None:
    """Rename the CLIP tower's keys in ``path/model.safetensors`` (LLaVA, LLaVA-NeXT) to the llava-hf layout.

    transformers 5.x saves the tower as ``vision_tower.embeddings.*``, ``vision_tower.encoder.*``;
    vLLM loads only ``vision_tower.vision_model.*`` (the layout of the llava-hf checkpoints),
    which transformers maps back on load, so the checkpoint serves both."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    renamed = {_vllm_tower_key(key): value for key, value in tensors.items()}
    save_file(renamed, file, metadata={"format": "pt"})


def _vllm_tower_key(key: str) -> str:
    before, tower, after = key.partition("vision_tower.")
    if not tower or after.startswith("vision_model."):
        return key
    return f"{before}vision_tower.vision_model.{after}"


def testbed_weights(name: str) -> Path:
    """The folder of the bundled testbed ``name`` (one of :data:`TESTBEDS`)."""
    from . import qwen

    if name not in TESTBEDS:
        raise ValueError(f"name must be one of {', '.join(TESTBEDS)}; got {name!r}")
    return qwen.WEIGHTS if TESTBEDS[name] == "qwen" else WEIGHTS


def load_model(name: str = "testbed") -> tuple[Any, Any]:
    """A bundled testbed (:data:`TESTBEDS`) or any image-text-to-text model path or hub id, with its processor."""
    if name in TESTBEDS:
        return load_testbed(testbed_weights(name))
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(name)
    return model.eval(), AutoProcessor.from_pretrained(name)


def load_testbed(path: str | Path | None = None) -> tuple[Any, Any]:
    """The bundled LLaVA testbed's model and processor (or the testbed saved at ``path``, LLaVA
    or Qwen), loaded offline."""
    from transformers import AutoModelForImageTextToText

    path = Path(path) if path is not None else WEIGHTS
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"path must hold a saved testbed (config.json), got {str(path)!r}; "
            "train one with `python -m vispruner.testbed.train`"
        )
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    return model.eval(), testbed_processor(path, model.config.model_type)


def testbed_processor(path: Path, model_type: str) -> Any:
    """The processor of the testbed saved at ``path``, offline; a Qwen testbed's is assembled
    without torchvision (see :func:`vispruner.testbed.qwen.assemble_processor`)."""
    from transformers import AutoProcessor

    from . import qwen

    if model_type == "qwen2_5_vl":
        return qwen.load_processor(path)
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def prompt(processor: Any, question: str) -> str:
    """``question`` about one image in the processor's chat format (or LLaVA-1.5's, if it has none)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def encode(processor: Any, images: list[Image.Image], questions: list[str]) -> Any:
    """A left-padded batch of prompts, one image each, ready for ``model.generate``."""
    texts = [prompt(processor, q) for q in questions]
    processor.tokenizer.padding_side = "left"  # generation continues every row at the same column
    return processor(images=images, text=texts, return_tensors="pt", padding=True)
