"""The override's checks (no vLLM needed: these run in the main suite too): the messages are
vispruner.apply's own, and what vLLM cannot run is refused with the reason."""

import re

import pytest
from transformers import Gemma3Config, LlavaConfig, Mistral3Config, Qwen2_5_VLConfig

import vispruner
from vispruner.vllm.settings import settings_for
from tests.tiny_models import tiny_llava, tiny_llava_next, tiny_onevision


def _config(model, options):
    config = model.config.__class__.from_dict(model.config.to_dict())
    if options is not None:
        config.vispruner = options
    return config


@pytest.mark.parametrize(
    "options",
    [
        {"num_tokens": 0},
        {"num_tokens": 2.5},
        {"keep_ratio": 0.0},
        {"num_tokens": 8, "keep_ratio": 0.5},
        {"method": "nope"},
        {"method": "random", "seed": -1},
        {"method": "fastervlm", "important_ratio": 0.3},
        {"method": "vispruner", "dominant": 3},
        {"budget": "per_video"},
    ],
)
@pytest.mark.parametrize("build", [tiny_llava, tiny_llava_next, tiny_onevision])
def test_bad_option_gets_apply_message(build, options):
    model = build()
    with pytest.raises((ValueError, TypeError)) as from_apply:
        vispruner.apply(model, **options)
    with pytest.raises(type(from_apply.value)) as from_override:
        settings_for(_config(model, options))
    assert str(from_override.value) == str(from_apply.value)


def test_no_override_means_no_pruning():
    assert settings_for(LlavaConfig()) is None


def test_good_options_give_apply_settings():
    settings = settings_for(_config(tiny_llava_next(), {"method": "pooling", "keep_ratio": 0.25, "budget": "per_image"}))
    assert (settings.method.name, settings.keep_ratio, settings.budget, settings.num_tokens) == ("pooling", 0.25, "per_image", None)


def test_fastv_refused_with_reason():
    with pytest.raises(ValueError, match="prunes inside the language model.*divprune, fastervlm, pooling, random, visionzip, vispruner"):
        settings_for(_config(tiny_llava(), {"method": "fastv", "num_tokens": 8}))


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_language_stage_methods_refused(method):
    with pytest.raises(ValueError, match=f"method '{method}' prunes inside the language model"):
        settings_for(_config(tiny_llava(), {"method": method, "num_tokens": 8}))


def test_instruction_conditioned_cdpruner_refused_with_reason():
    with pytest.raises(ValueError, match="'cdpruner' selects by each image's instruction.*divprune, fastervlm"):
        settings_for(_config(tiny_llava(), {"method": "cdpruner", "num_tokens": 8}))


def test_original_positions_refused():
    with pytest.raises(ValueError, match="positions='original' is not supported in vLLM"):
        settings_for(_config(tiny_llava(), {"positions": "original"}))


@pytest.mark.parametrize(("name", "value"), [("vision_feature_select_strategy", "full"), ("vision_feature_layer", [-2, -1])])
def test_llava_tower_the_cls_row_cannot_read_refused(name, value):
    # The [CLS] row is read from one layer's output, and dropped from the features only with "default".
    config = _config(tiny_llava(), {"num_tokens": 8})
    assert settings_for(config).num_tokens == 8
    setattr(config, name, value)
    with pytest.raises(TypeError, match=f"needs a CLIP vision tower .*got a 'clip_vision_model' tower, .*{re.escape(repr(value))}"):
        settings_for(config)


@pytest.mark.parametrize(
    ("name", "value"),
    [("vision_aspect_ratio", "anyres_max_4"), ("vision_feature_select_strategy", "default"), ("vision_feature_layer", [-2, -1])],
)
def test_onevision_packing_vllm_does_not_follow_refused(name, value):
    # vLLM's OneVision packs every image anyres_max_9 from one layer's every patch, whatever the config says.
    config = _config(tiny_onevision(), {"num_tokens": 8})
    assert settings_for(config).num_tokens == 8
    setattr(config, name, value)
    with pytest.raises(TypeError, match=f"packed anyres_max_9 .*got a 'siglip_vision_model' tower, .*{re.escape(repr(value))}"):
        settings_for(config)


def test_onevision_grid_methods_per_image_refused():
    with pytest.raises(ValueError, match="'pooling' needs one patch grid per budget unit.*use budget='per_crop'"):
        settings_for(_config(tiny_onevision(), {"method": "pooling", "num_tokens": 8, "budget": "per_image"}))


def test_onevision_original_positions_refused():
    with pytest.raises(ValueError, match="positions='original' is not supported in vLLM"):
        settings_for(_config(tiny_onevision(), {"positions": "original"}))


def test_unserved_family_named():
    config = Mistral3Config()
    config.vispruner = {"num_tokens": 8}
    with pytest.raises(TypeError, match=r"prunes LLaVA-1\.5 \(LlavaForConditionalGeneration\), LLaVA-NeXT .*Qwen2\.5-VL images .*Gemma 3 images .*got a 'mistral3' model"):
        settings_for(config)


def test_gemma3_positions_compacted_only():
    # vLLM numbers Gemma 3's pruned prompt 0, 1, 2, ... (the library's default for it); original is refused.
    config = Gemma3Config()
    config.vispruner = {"num_tokens": 8}
    assert settings_for(config).positions == "compacted"
    config.vispruner = {"num_tokens": 8, "positions": "original"}
    with pytest.raises(ValueError, match=r"positions='original' is not supported in vLLM for Gemma 3 images"):
        settings_for(config)


def test_qwen_keeps_original_positions():
    # Kept Qwen tokens keep their 3D positions (the library's only setting for Qwen-VL): compacted is refused
    # with apply's message, the default is original.
    config = Qwen2_5_VLConfig()
    config.vispruner = {"num_tokens": 8}
    assert settings_for(config).positions == "original"
    config.vispruner = {"num_tokens": 8, "positions": "compacted"}
    with pytest.raises(ValueError, match="keeps the 3D M-RoPE positions of the unpruned prompt"):
        settings_for(config)


def test_not_a_dict_refused():
    with pytest.raises(ValueError, match='hf_overrides\\["vispruner"\\] must be a dict'):
        settings_for(_config(tiny_llava(), 64))
