"""The lmms-eval plugin reads Qwen3.5-MoE, GLM-4.1V and GLM-4.5V checkpoints' family from their config."""

from __future__ import annotations

import pytest

from vispruner.lmms.arguments import parse_model_args
from vispruner.lmms.loading import check_checkpoint

from ..tiny_glm import tiny_glm4v, tiny_glm4v_moe
from ..tiny_qwen import tiny_qwen3_5_moe


@pytest.mark.parametrize(
    ("build", "model_type", "fastv"),
    [(tiny_qwen3_5_moe, "qwen3_5_moe", False), (tiny_glm4v, "glm4v", True), (tiny_glm4v_moe, "glm4v_moe", True)],
)
def test_family_and_its_rules_come_from_the_config(tmp_path, build, model_type, fastv):
    build().config.save_pretrained(tmp_path)  # config only: nothing to load
    assert check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8})) == model_type
    with pytest.raises(ValueError, match="keeps the 3D M-RoPE positions .* must be 'original'"):
        check_checkpoint(parse_model_args({"pretrained": str(tmp_path), "num_tokens": 8, "positions": "compacted"}))
    args = parse_model_args({"pretrained": str(tmp_path), "method": "fastv"})
    if fastv:
        assert check_checkpoint(args) == model_type
    else:
        with pytest.raises(ValueError, match="fastv does not support Qwen3.5-MoE"):
            check_checkpoint(args)
