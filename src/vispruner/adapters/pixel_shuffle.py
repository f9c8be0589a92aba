"""Per-patch signals carried through a pixel shuffle, as the features are.

InternVL and SmolVLM / Idefics3 fold each s x s group of patches into one language-model token by
a pixel shuffle: the group's patch features are concatenated along the channels, block after
block. The method chooses among those tokens, so a per-patch signal (attention, keys) must be
grouped the same way. Running the model's own shuffle on the signal, as channels, groups it
exactly as the features; the mean over each token's blocks is the token's signal (as Qwen-VL's
merge groups are averaged).
"""

from __future__ import annotations

from typing import Callable

import torch

#: ``(n, N, K) per-patch channels -> (n, T, g * K)``: the model's pixel shuffle, g patches a token.
Shuffle = Callable[[torch.Tensor], torch.Tensor]


def shuffled_mean(shuffle: Shuffle, values: torch.Tensor) -> torch.Tensor:
    """(n, N, ...) per-patch values -> (n * T, ...) float32: each token's mean over its patches."""
    count, patches = values.shape[:2]
    trailing = values.shape[2:]
    channels = values.reshape(count, patches, -1).float()
    width = channels.shape[-1]
    grouped = shuffle(channels)
    return grouped.reshape(count, grouped.shape[1], -1, width).mean(dim=2).reshape(-1, *trailing)
