"""Drift in transformers' generation protocol is refused, never guessed at; the tested range is
the one pip is told."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import vispruner
from vispruner.adapters import hf_seam

from .cases import model_and_inputs

ROOT = Path(__file__).resolve().parents[2]


def prefilled(method: str = "vispruner"):
    """A pruned LLaVA batch after its prefill: the model, the inputs, the filled cache and the next ids."""
    model, inputs = model_and_inputs("llava")
    options = {"layer": 1} if method == "fastv" else {}  # the tiny language model has 2 layers
    vispruner.apply(model, num_tokens=4, method=method, **options)
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
    next_ids = output.logits[:, -1].argmax(-1, keepdim=True)
    return model, inputs, hf_seam.cache_of(output), next_ids


def step_mask(inputs, next_ids):
    return torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], dim=1)


@pytest.mark.parametrize("method", ["vispruner", "fastv"])
def test_a_cache_under_a_name_the_wrappers_never_saw_raises_instead_of_answering(method):
    model, inputs, cache, next_ids = prefilled(method)
    assert cache.get_seq_length() > 0
    with pytest.raises(NotImplementedError, match=r"kv_state=DynamicCache.*transformers>=5\.19,<5\.26"):
        with torch.no_grad():
            model(input_ids=next_ids, attention_mask=step_mask(inputs, next_ids), kv_state=cache)


def test_a_renamed_cache_inside_the_language_model_raises_for_fastv():
    """FastV's cut reads the cache a decoder layer receives: a rename there is refused too."""
    model, inputs, cache, next_ids = prefilled("fastv")
    layer = model.model.language_model.layers[1]

    def rename(module, args, kwargs):
        kwargs = dict(kwargs)
        for name in hf_seam.CACHE_NAMES:
            if name in kwargs:
                kwargs["kv_state"] = kwargs.pop(name)
        return args, kwargs

    handle = layer.register_forward_pre_hook(rename, with_kwargs=True, prepend=True)
    try:
        with pytest.raises(NotImplementedError, match="decoder layer 1 received kv_state=DynamicCache"):
            with torch.no_grad():
                model(input_ids=next_ids, attention_mask=step_mask(inputs, next_ids), past_key_values=cache)
    finally:
        handle.remove()


def test_an_unknown_mask_or_position_argument_raises():
    model, inputs = model_and_inputs("llava")
    vispruner.apply(model, num_tokens=4)
    for name in ("attention_mask_4d", "text_position_ids"):
        with pytest.raises(NotImplementedError, match=name):
            with torch.no_grad():
                model(**inputs, **{name: inputs["attention_mask"]})
    with pytest.raises(NotImplementedError, match="generate"):
        model.generate(**inputs, max_new_tokens=1, kv_state=DynamicCache())


def test_the_cache_is_read_under_the_names_the_installed_function_takes():
    def before_5_24(past_key_values=None, attention_mask=None):
        pass

    def from_5_24(cache=None, attention_mask=None):  # past_key_values: a deprecated alias
        pass

    cache = DynamicCache()
    assert hf_seam.cache_in({"past_key_values": cache, "attention_mask": None}, before_5_24, "f") is cache
    with pytest.raises(NotImplementedError, match="f received cache=DynamicCache"):
        hf_seam.cache_in({"cache": cache}, before_5_24, "f")  # the model would ignore it
    for name in hf_seam.CACHE_NAMES:
        assert hf_seam.cache_in({name: cache}, from_5_24, "f") is cache
    with pytest.raises(ValueError, match="both"):
        hf_seam.cache_in({"cache": cache, "past_key_values": DynamicCache()}, from_5_24, "f")


def test_a_decode_step_reads_the_cache_under_the_old_name_and_the_new():
    """``past_key_values=`` (5.19-5.23; a deprecated alias from 5.24) and ``cache=`` (5.24) give
    the same step after a pruned prefill; before 5.24 ``cache=`` is no argument and is refused."""
    logits = {}
    for name in hf_seam.CACHE_NAMES:
        model, inputs, cache, next_ids = prefilled()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                logits[name] = model(input_ids=next_ids, attention_mask=step_mask(inputs, next_ids), **{name: cache}).logits
            except NotImplementedError:
                assert hf_seam.cache_keyword(type(model).forward) != name
    assert "past_key_values" in logits
    if len(logits) == 2:
        assert torch.equal(logits["cache"], logits["past_key_values"])


@pytest.mark.parametrize(
    "version, tested",
    [("5.18.2", False), ("5.19.0", True), ("5.22.0rc1", True), ("5.24.9", True), ("5.25.0", True), ("5.26.0", False), ("6.0.0", False)],
)
def test_the_tested_range_is_half_open(version, tested):
    assert hf_seam.is_tested(version) is tested


def test_apply_warns_once_outside_the_tested_range(monkeypatch):
    model, _ = model_and_inputs("llava")
    monkeypatch.setattr(hf_seam, "installed_version", lambda: "5.99.0")
    hf_seam.warn_if_untested.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"tested on transformers>=5\.19,<5\.26; transformers 5\.99\.0"):
            vispruner.apply(model, num_tokens=4)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            vispruner.apply(model, num_tokens=8)
    finally:
        hf_seam.warn_if_untested.cache_clear()


def test_the_installed_release_is_tested():
    """The suite itself runs on a tested release (CI installs from pyproject's range)."""
    assert hf_seam.is_tested(hf_seam.installed_version())


def test_pyproject_and_the_nox_matrix_declare_exactly_the_tested_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [req for req in project["dependencies"] if req.startswith("transformers")]
    assert declared == [hf_seam.TESTED_RANGE]
    matrix = re.search(r"TRANSFORMERS = \[(.*?)\]", (ROOT / "noxfile.py").read_text()).group(1)
    minors = [tuple(map(int, v.split(".")[:2])) for v in re.findall(r'"([\d.]+)"', matrix)]
    low, high = (tuple(map(int, v.split("."))) for v in hf_seam.TESTED)
    assert minors == [(low[0], minor) for minor in range(low[1], high[1])]


@pytest.mark.parametrize(("version", "refused"), [("5.19.0", False), ("5.20.2", True), ("5.21.1", False)])
def test_a_release_whose_stock_code_cannot_take_pruned_tokens_is_refused(monkeypatch, version, refused):
    """transformers 5.20's SmolVLM cuts its image features into blocks of ``patch_size`` rows."""
    from tests.tiny_smolvlm import tiny_idefics3, tiny_smolvlm

    smolvlm = tiny_smolvlm()  # built (and checked) under the installed release
    monkeypatch.setattr(hf_seam, "installed_version", lambda: version)
    vispruner.apply(tiny_idefics3(), num_tokens=4)  # Idefics3 is fine on every release
    vispruner.apply(smolvlm, num_tokens=4, method="fastv", layer=1)  # FastV keeps every feature
    if refused:
        with pytest.raises(TypeError, match=r"SmolVLMForConditionalGeneration.*outside >=5\.20,<5\.21; transformers 5\.20\.2"):
            vispruner.apply(smolvlm, num_tokens=4)
    else:
        vispruner.apply(smolvlm, num_tokens=4)
