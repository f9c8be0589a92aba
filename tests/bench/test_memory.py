"""Peak tensor memory on CPU and the KV-cache size, against sizes worked out by hand."""

from __future__ import annotations

import torch

from vispruner.bench.memory import PeakMemory, kv_cache_bytes, resident_bytes
from tests.tiny_models import tiny_inputs, tiny_llava

MIB = 2**20


def test_cpu_peak_counts_allocations_until_they_are_freed():
    memory = PeakMemory(torch.device("cpu"), resident=100)
    weight = torch.ones(256, 1024)  # 1 MiB, made before: resident, not counted by the watch
    with memory.measure():
        a = torch.ones(512, 1024)  # 2 MiB
        b = a.t()  # a view: no new storage
        a.mul_(2)  # in place: no new storage
        c = a @ weight.t()  # 512 x 256 float32: 0.5 MiB; peak 2.5 MiB
        del a, b, c
        d = torch.ones(256, 1024)  # 1 MiB, after 2.5 MiB were freed
        del d
    assert memory.peak_bytes == 100 + int(2.5 * MIB)


def test_resident_bytes_count_shared_storage_once():
    weight = torch.ones(256, 1024)
    assert resident_bytes(weight, weight.t(), weight[:10]) == MIB


def test_kv_cache_bytes_match_the_config():
    model = tiny_llava()
    inputs = tiny_inputs(model, ["w1 <image> w2 w3"])
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    text = model.config.text_config
    length = inputs["input_ids"].shape[1]
    head_dim = text.hidden_size // text.num_attention_heads
    expected = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * length * 4  # float32
    assert kv_cache_bytes(cache) == expected
