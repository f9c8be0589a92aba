"""The plugin's model_args: every apply option and loading setting passes, bad ones fail before loading."""

import json

import pytest
from transformers import LlamaConfig

from vispruner.lmms.arguments import ModelArgs, parse_model_args
from vispruner.lmms.loading import check_checkpoint


def test_apply_options_and_loading_settings_pass_through():
    args = parse_model_args(
        {
            "pretrained": "testbed",
            "method": "vispruner",
            "num_tokens": 32,
            "important_ratio": 0.25,
            "budget": "per_image",
            "dtype": "bfloat16",
            "device_map": "auto",
            "attn_implementation": "sdpa",
            "batch_size": "8",  # lmms-eval passes --batch_size as text
            "max_batch_size": None,  # lmms-eval's unset flags arrive as None
            "device": None,
        }
    )
    assert args == ModelArgs(
        "testbed", "vispruner", {"num_tokens": 32, "important_ratio": 0.25, "budget": "per_image"},
        dtype="bfloat16", device_map="auto", attn_implementation="sdpa", batch_size=8,
    )
    assert parse_model_args({"pretrained": "x", "method": "random", "seed": 3, "keep_ratio": 0.5}).pruning == {
        "seed": 3, "keep_ratio": 0.5
    }
    assert parse_model_args({"pretrained": "x", "method": "fastv", "layer": 3, "positions": "original"}).pruning == {
        "layer": 3, "positions": "original"
    }
    assert parse_model_args({"pretrained": "x", "method": "none"}).pruning == {}


@pytest.mark.parametrize(
    "given, message",
    [
        ({}, "pretrained is required"),
        ({"method": "prune_all"}, "method must be 'none' or one of .*vispruner"),
        ({"method": "none", "num_tokens": 64}, "num_tokens: not used with method=none"),
        ({"num_tokens": 0}, "model_args num_tokens must be an integer >= 1"),
        ({"num_tokens": 8, "keep_ratio": 0.5}, "num_tokens or keep_ratio, not both"),
        ({"method": "fastervlm", "important_ratio": 0.3}, "important_ratio is an option of methods vispruner"),
        ({"method": "random", "layer": 2}, "layer: unknown for method=random; allowed: .*seed"),
        ({"budget": "per_video"}, "budget must be one of"),
        ({"positions": "shifted"}, "positions must be"),
        ({"method": "fastv", "positions": "compacted"}, "positions='compacted' is not supported by fastv"),
        ({"dtype": "float64"}, "dtype must be one of auto, float32"),
        ({"attn_implementation": "fast"}, "attn_implementation must be one of eager, sdpa"),
        ({"device_map": ""}, "device_map must be a device string"),
        ({"batch_size": "auto"}, "batch_size must be an integer >= 1"),
        ({"max_frames_num": 0}, "max_frames_num must be an integer >= 1"),
        ({"max_batch_size": 4}, "max_batch_size goes with batch_size=auto"),
    ],
)
def test_bad_model_args_fail_with_one_line_naming_the_key(given, message):
    given = {"pretrained": "testbed", **given} if given else {}
    with pytest.raises(ValueError, match=message) as error:
        parse_model_args(given)
    assert "\n" not in str(error.value)


def test_family_comes_from_the_config_before_any_weights(tmp_path):
    assert check_checkpoint(parse_model_args({"pretrained": "testbed"})) == "llava"
    LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=8, num_attention_heads=1).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    with pytest.raises(ValueError, match=r"is a 'llama' model; vispruner supports LLaVA-1.5"):
        check_checkpoint(parse_model_args({"pretrained": str(tmp_path)}))  # a config and no weights: refused


def test_family_rules_are_checked_from_the_config_too(tmp_path):
    from tests.tiny_qwen import tiny_qwen2_5_vl

    tiny_qwen2_5_vl().config.save_pretrained(tmp_path)  # config only: nothing to load
    args = parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8, "positions": "compacted"})
    with pytest.raises(ValueError, match="model_args Qwen2.5-VL keeps the 3D M-RoPE positions .* must be 'original'"):
        check_checkpoint(args)
    assert check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8})) == "qwen2_5_vl"


def test_a_method_the_family_cannot_run_is_refused_from_the_config(tmp_path):
    from tests.tiny_models import tiny_gemma3

    tiny_gemma3().config.save_pretrained(tmp_path)  # config only: nothing to load
    with pytest.raises(ValueError, match="model_args fastv does not support Gemma 3: its language model has sliding-window"):
        check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "method": "fastv"}))


def test_every_family_apply_supports_loads_through_the_auto_class():
    from importlib import import_module

    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as AUTO

    from vispruner.adapters import FAMILIES

    for model_type, module in FAMILIES.items():
        supported = import_module(module).FAMILY.model_class
        names = {c.__name__ for c in (supported if isinstance(supported, tuple) else (supported,))}
        assert AUTO.get(model_type) in names, model_type
