"""Models to benchmark: architecture presets with random weights, or a local path / hub id.

Timings, FLOPs and memory depend on the architecture, not on the weight values, so a preset
builds the published architecture from its config with random weights and downloads nothing.
``layers`` cuts the language model to its first N decoder layers so that a 7B preset fits a CPU
run; only what runs is built (and, for a checkpoint, loaded).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Preset:
    """An architecture to build with random weights.

    Attributes:
        name: what ``--preset`` takes.
        source: the published checkpoint whose config this copies ("" for the CI sizes).
        config: builds the model config.
    """

    name: str
    source: str
    config: Callable[[], "PretrainedConfig"]


def _clip_l_336() -> dict:
    # openai/clip-vit-large-patch14-336, as in every LLaVA-1.5 / LLaVA-NeXT checkpoint.
    return dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _vicuna(size: str) -> dict:
    # lmsys/vicuna-{7b,13b}-v1.5 (Llama 2 shapes) with the LLaVA vocabulary of 32064.
    shapes = {
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
        "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    }[size]
    return dict(
        shapes,
        num_key_value_heads=shapes["num_attention_heads"],
        vocab_size=32064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=0,
    )


def _llava(text: dict, vision: dict, **extra) -> "PretrainedConfig":
    """A LLaVA-1.5 config, or LLaVA-NeXT when ``extra`` has ``image_grid_pinpoints``."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    family = LlavaNextConfig if "image_grid_pinpoints" in extra else LlavaConfig
    return family(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        **extra,
    )


_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _siglip(image_size: int, layers: int) -> dict:
    # google/siglip-so400m-patch14-384, the tower of LLaVA-OneVision (last layer dropped: 26) and
    # of Gemma 3 (27 layers, run at 896 px).
    return dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=layers,
        num_attention_heads=16,
        image_size=image_size,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def _onevision_7b() -> "PretrainedConfig":
    """llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP at 384 px (27 x 27 patches), anyres_max_9 over
    grids of up to 6 x 6 crops, Qwen2-7B."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152128,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        pad_token_id=151643,
    )
    pinpoints = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**_siglip(384, 26)),
        text_config=text,
        image_token_index=151646,
        video_token_index=151647,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )


def _gemma3_4b() -> "PretrainedConfig":
    """google/gemma-3-4b-it: SigLIP at 896 px (64 x 64 patches pooled 4 x 4 to 256 tokens), a Gemma 3
    language model with five sliding-window layers (1024) to each global one."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        vocab_size=262208,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )
    return Gemma3Config(vision_config=SiglipVisionConfig(**_siglip(896, 27)), text_config=text, mm_tokens_per_image=256)

# The tiny presets keep the LLaVA structure (feature layer -2 of a CLIP tower, a Llama language
# model, here with grouped-query attention, deep enough for FastV at its default layer 2) at
# sizes that run in milliseconds, for CI.
_TINY_VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    image_size=112, patch_size=14, projection_dim=64,
)
_TINY_TEXT = dict(
    hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, pad_token_id=0,
)

def _qwen2_5_vl_7b() -> "PretrainedConfig":
    # Qwen/Qwen2.5-VL-7B-Instruct: a 32-block windowed ViT (full attention in blocks 7, 15, 23,
    # 31) and the Qwen2.5-7B decoder.
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=2, hidden_act="silu",
        ),
        text_config=dict(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        **_QWEN_IDS,
    )


def _qwen3_vl_8b() -> "PretrainedConfig":
    # Qwen/Qwen3-VL-8B-Instruct: a 27-block ViT with deepstack features from blocks 8, 16, 24,
    # and the Qwen3-8B decoder.
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
            deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh",
        ),
        text_config=dict(
            hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=262144, rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True,
            },
        ),
        tie_word_embeddings=False,
        **_QWEN_IDS,
    )


def _tiny_qwen2_5_vl() -> "PretrainedConfig":
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=14,
            window_size=56, fullatt_block_indexes=[1],
        ),
        text_config=dict(
            _TINY_TEXT, pad_token_id=None, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        ),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
    )


def _glm_vision(merger_width: int) -> dict:
    # GLM-4.1V's and GLM-4.5V's 24-block ViT (from AIMv2-huge at 336 px, 14 px patches; 2D rotary,
    # learned positions interpolated to the image); the merger's MLP width differs.
    return dict(
        depth=24, hidden_size=1536, intermediate_size=merger_width, num_heads=12, out_hidden_size=4096, image_size=336,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu", rms_norm_eps=1e-5,
    )


def _glm4v_9b() -> "PretrainedConfig":
    # zai-org/GLM-4.1V-9B-Thinking: the ViT, whose 2 x 2 conv and merger make one token per
    # 28 x 28 px, and the GLM-4-9B decoder (2 key/value heads, half of each head rotated, M-RoPE
    # sections 8/12/12).
    from transformers import Glm4vConfig

    return Glm4vConfig(
        vision_config=_glm_vision(merger_width=13696),
        text_config=dict(
            hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
            num_key_value_heads=2, vocab_size=151552, max_position_embeddings=65536, rms_norm_eps=1e-5,
            pad_token_id=151329,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5,
            },
        ),
        **_GLM_IDS,
        image_token_id=151343, video_token_id=151344,
    )


def _glm4_5v() -> "PretrainedConfig":
    # zai-org/GLM-4.5V (106B, 12B active): GLM-4.1V's tower and the GLM-4.5-Air decoder, 46 layers of
    # 96 query and 8 key/value heads of 128, the first dense, then 128 routed experts (8 per
    # token) and a shared one of width 1408.
    from transformers import Glm4vMoeConfig

    return Glm4vMoeConfig(
        vision_config=_glm_vision(merger_width=10944),
        text_config=dict(
            hidden_size=4096, intermediate_size=10944, num_hidden_layers=46, num_attention_heads=96,
            num_key_value_heads=8, head_dim=128, vocab_size=151552, max_position_embeddings=65536, rms_norm_eps=1e-5,
            attention_bias=True, moe_intermediate_size=1408, n_routed_experts=128, num_experts_per_tok=8,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
            pad_token_id=151329,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5,
            },
        ),
        **_GLM_IDS,
        image_token_id=151363, video_token_id=151364,
    )


def _tiny_glm4_5v() -> "PretrainedConfig":
    # GLM-4.5V's structure (a dense first layer, then experts) at CI sizes.
    from transformers import Glm4vMoeConfig

    return Glm4vMoeConfig(
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, image_size=112,
            patch_size=14,
        ),
        text_config=dict(
            _TINY_TEXT, head_dim=32, moe_intermediate_size=64, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, bos_token_id=1, eos_token_id=2,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "partial_rotary_factor": 0.5,
            },
        ),
        image_token_id=500, video_token_id=501, image_start_token_id=502, image_end_token_id=503,
        video_start_token_id=504, video_end_token_id=505,
    )


def _qwen3_5_35b_a3b() -> "PretrainedConfig":
    # Qwen/Qwen3.5-35B-A3B: Qwen3-VL's 27-block ViT, and a hybrid decoder of 40 layers (three
    # gated-delta-rule layers to each gated softmax one), every layer 256 experts (8 per token) of
    # width 512 plus a gated shared expert.
    from transformers import Qwen3_5MoeConfig

    return Qwen3_5MoeConfig(
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
        ),
        text_config=dict(
            hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
            vocab_size=248320, max_position_embeddings=262144, rms_norm_eps=1e-6, linear_conv_kernel_dim=4,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
            moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
            full_attention_interval=4,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10],
                "mrope_interleaved": True, "partial_rotary_factor": 0.25,
            },
        ),
        image_token_id=248056, video_token_id=248057, vision_start_token_id=248053, vision_end_token_id=248054,
    )


def _tiny_qwen3_5_moe() -> "PretrainedConfig":
    # Qwen3.5-MoE's structure (gated-delta-rule and gated softmax layers, experts everywhere) at CI sizes.
    from transformers import Qwen3_5MoeConfig

    return Qwen3_5MoeConfig(
        vision_config=dict(
            depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=14,
            num_position_embeddings=64,
        ),
        text_config=dict(
            _TINY_TEXT, pad_token_id=None, bos_token_id=1, eos_token_id=2, head_dim=32, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=64,
            shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2, full_attention_interval=2,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                "partial_rotary_factor": 0.25,
            },
        ),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
    )


_GLM_IDS = dict(image_start_token_id=151339, image_end_token_id=151340, video_start_token_id=151341, video_end_token_id=151342)
def _internvl3_8b() -> "PretrainedConfig":
    """OpenGVLab/InternVL3-8B-hf: InternViT-300M at 448 px (32 x 32 patches and a [CLS], last layer),
    pixel-shuffled 2 x 2 to 256 tokens a tile, and the Qwen2.5-7B decoder."""
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=448,
            patch_size=14, attention_bias=True, use_qk_norm=False, norm_type="layer_norm", layer_norm_eps=1e-6,
            layer_scale_init_value=0.1, use_mean_pooling=True, hidden_act="gelu",
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768,
            rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            bos_token_id=151643, pad_token_id=151643,
        ),
        image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )


def _idefics3_8b() -> "PretrainedConfig":
    """HuggingFaceM4/Idefics3-8B-Llama3: SigLIP-so400m at 364 px tiles (26 x 26 patches), pixel-shuffled
    2 x 2 to 169 tokens a tile, and the Llama 3.1 8B decoder."""
    from transformers import Idefics3Config

    return Idefics3Config(
        vision_config=dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=364,
            patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        ),
        text_config=dict(
            model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, vocab_size=128259, max_position_embeddings=131072,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=128000, pad_token_id=128002,
        ),
        image_token_id=128257, scale_factor=2, tie_word_embeddings=False,
    )


def _mistral_small_3_1() -> "PretrainedConfig":
    """mistralai/Mistral-Small-3.1-24B-Instruct-2503: a Pixtral tower (24 layers, 14 px patches, up to
    1540 px), the 2 x 2 patch merger, and the Mistral Small 24B decoder; transformers' defaults."""
    from transformers import Mistral3Config

    return Mistral3Config(image_token_index=10)


def _gemma4_31b() -> "PretrainedConfig":
    """google/gemma-4-31B-it: its encoder (27 layers, 1152 wide, 16 px patches pooled 3 x 3), a
    60-layer decoder (5 sliding-window layers of 256-wide heads per global layer of 512-wide heads
    with 4 key heads that serve as values), no per-layer embeddings, no audio tower."""
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    vision = Gemma4VisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        head_dim=72, patch_size=16, pooling_kernel_size=3, position_embedding_size=10240, standardize=True,
    )
    text = Gemma4TextConfig(
        vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
        num_key_value_heads=16, head_dim=256, global_head_dim=512, num_global_key_value_heads=4, attention_k_eq_v=True,
        sliding_window=1024, final_logit_softcapping=30.0, use_bidirectional_attention="vision",
        hidden_size_per_layer_input=0, max_position_embeddings=262144,
    )
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None)


_QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)

PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "llava-1.5-7b",
            "llava-hf/llava-1.5-7b-hf",
            lambda: _llava(_vicuna("7b"), _clip_l_336(), image_token_id=32000, pad_token_id=32001),
        ),
        Preset(
            "llava-1.5-13b",
            "llava-hf/llava-1.5-13b-hf",
            lambda: _llava(_vicuna("13b"), _clip_l_336(), image_token_id=32000, pad_token_id=32001),
        ),
        Preset(
            "llava-next-7b",
            "llava-hf/llava-v1.6-vicuna-7b-hf",
            lambda: _llava(
                _vicuna("7b"), _clip_l_336(), image_token_id=32000, image_grid_pinpoints=_NEXT_PINPOINTS
            ),
        ),
        Preset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", _qwen2_5_vl_7b),
        Preset("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", _qwen3_vl_8b),
        Preset("llava-onevision-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", _onevision_7b),
        Preset("gemma-3-4b", "google/gemma-3-4b-it", _gemma3_4b),
        Preset("glm-4.1v-9b", "zai-org/GLM-4.1V-9B-Thinking", _glm4v_9b),
        Preset("glm-4.5v", "zai-org/GLM-4.5V", _glm4_5v),
        Preset("qwen3.5-35b-a3b", "Qwen/Qwen3.5-35B-A3B", _qwen3_5_35b_a3b),
        Preset("internvl3-8b", "OpenGVLab/InternVL3-8B-hf", _internvl3_8b),
        Preset("idefics3-8b", "HuggingFaceM4/Idefics3-8B-Llama3", _idefics3_8b),
        Preset("mistral-small-3.1-24b", "mistralai/Mistral-Small-3.1-24B-Instruct-2503", _mistral_small_3_1),
        Preset("gemma-4-31b", "google/gemma-4-31B-it", _gemma4_31b),
        Preset("tiny-llava", "", lambda: _llava(_TINY_TEXT, _TINY_VISION, image_token_id=511)),
        Preset("tiny-qwen2.5-vl", "", _tiny_qwen2_5_vl),
        Preset("tiny-glm-4.5v", "", _tiny_glm4_5v),
        Preset("tiny-qwen3.5-moe", "", _tiny_qwen3_5_moe),
        Preset(
            "tiny-llava-next",
            "",
            lambda: _llava(
                _TINY_TEXT, _TINY_VISION, image_token_id=511, image_grid_pinpoints=[[112, 224], [224, 112], [224, 224]]
            ),
        ),
    )
}


def _cut_layers(config: "PretrainedConfig", layers: int | None) -> int:
    """Keep the first ``layers`` decoder layers in ``config``; return the full count."""
    text = config.text_config
    full = text.num_hidden_layers
    if layers is None:
        return full
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= full:
        raise ValueError(f"layers must be an integer in [1, {full}] for this model; got {layers!r}")
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = text.layer_types[:layers]
    return full


def build_preset(
    name: str,
    layers: int | None = None,
    dtype: "torch.dtype | None" = None,
    seed: int = 0,
    device: "str | torch.device" = "cpu",
    vocab_size: int | None = None,
) -> tuple["PreTrainedModel", int]:
    """A random-weight model of preset ``name`` (see :data:`PRESETS`) and its full LM depth.

    Args:
        name: a key of :data:`PRESETS`.
        layers: keep only the first N language-model layers (1 <= N <= full depth); None keeps all.
        dtype: parameter dtype (default float32).
        seed: seed of the random weights.
        device: where the weights are created and initialised (a full 7B model is initialised
            in seconds on a GPU, in minutes on a CPU).
        vocab_size: build the language model with this many vocabulary rows instead (None: the
            published count); only the embedding lookup and the logits read them.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}; got {name!r}")
    config = PRESETS[name].config()
    full = _cut_layers(config, layers)
    if vocab_size is not None:
        config.text_config.vocab_size = vocab_size
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype or torch.float32)
    return model.eval(), full


def load_model(
    path: str, layers: int | None = None, dtype: "torch.dtype | None" = None
) -> tuple["PreTrainedModel", int]:
    """A checkpoint (local path or hub id) and its full LM depth; ``layers`` loads only the first N."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    full = _cut_layers(config, layers)
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype or "auto")
    return model.eval(), full
