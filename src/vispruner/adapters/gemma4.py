"""Gemma 4 (``Gemma4ForConditionalGeneration``): its own vision encoder, images at their own sizes.

The processor cuts each image (or video frame) into 16 px patches at an aspect-preserving size
within a token budget, lists them in raster order with their (x, y) positions and pads every
image to one patch count (position -1). The encoder (2D rotary positions, q/k norms) attends
within an image; its pooler averages each k x k window of patches by position (``k`` =
``pooling_kernel_size``) into one token, drops the padding, scales and standardises; the
embedder normalises (``embedding_pre_projection_norm``) and projects. In the prompt an image is
``<boi>``, its tokens, ``<eoi>``; a video is, per frame, a timestamp and the same. The axes of
docs/families:

* signal: the attention each patch receives from its image's patches in the last encoder layer
  (after the layer's q/k norms and its rotary embedding, padding excluded), averaged over heads
  and queries, then over each k x k window by the pooler's own pooling;
* diversity features: the pooled, standardised features (the embedder's norm input);
* unit: an image; a video frame (``budget="per_image"``: a whole video);
* order and packing: each image's pooled grid in raster order, images (frames) in order;
* positions: 1D, compacted (or original);
* other streams: ``mm_token_type_ids`` (bidirectional attention among an image's tokens in the
  sliding-window layers of the larger checkpoints) and ``per_layer_inputs`` (the per-layer
  embeddings of the small ones, when given with ``inputs_embeds``; from ``input_ids`` the model
  computes them from the compacted ids). Audio tokens stay, as text does (its features pass on).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn
from transformers import Gemma4ForConditionalGeneration

from .attention_received import mean_attention_received
from .attention_row import RotaryCapture
from .siglip import substitute_changed
from .vision_stage import Family, Item, Modality

IMAGE = Modality(
    name="image", encoder="get_image_features", pixels="pixel_values", token_id="image_token_id",
    arguments=("image_position_ids",),
)
VIDEO = Modality(
    name="video", encoder="get_video_features", pixels="pixel_values_videos", token_id="video_token_id",
    arguments=("video_position_ids", "num_frames_per_video"),
)
#: Where each modality's feature call gets its patch positions.
POSITIONS = {"image": "image_position_ids", "video": "video_position_ids"}


class Gemma4Vision:
    """:class:`~.vision_stage.VisionSide` of one Gemma 4 model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        tower = model.model.vision_tower
        if tower is None:
            raise TypeError("this Gemma 4 model has no vision tower (vision_config is None); there is nothing to prune")
        self.attention = tower.encoder.layers[-1].self_attn
        if not all(hasattr(self.attention, name) for name in ("q_norm", "k_norm", "head_dim", "scaling")):
            raise TypeError(f"vision tower {type(tower).__name__} is not the stock Gemma 4 encoder")
        self.kernel = model.config.vision_config.pooling_kernel_size

    def grids(self, modality: Modality, arguments: dict[str, Any]) -> list[tuple[int, int]]:
        """Per image (frame), its (rows, cols) of pooled tokens, from its patches' positions."""
        positions = _positions(modality, arguments)
        real = (positions != -1).all(dim=-1, keepdim=True)
        extent = (torch.where(real, positions, -1).amax(dim=1) + 1).tolist()  # (x, y) patches per side
        return [(int(y) // self.kernel, int(x) // self.kernel) for x, y in extent]

    def items(self, modality: Modality, arguments: dict[str, Any]) -> list[Item]:
        grids = self.grids(modality, arguments)
        if modality.name == "image":
            return [Item(1, grid) for grid in grids]
        frames = arguments.get("num_frames_per_video")
        if frames is None:
            raise ValueError("get_video_features needs num_frames_per_video (the video processor returns it) to prune")
        items, start = [], 0
        for count in torch.as_tensor(frames).tolist():
            shapes = tuple(grids[start : start + count])
            start += count
            items.append(Item(count, shapes[0], shapes=None if len(set(shapes)) == 1 else shapes))
        return items

    def tap(self, modality: Modality, arguments: dict[str, Any], needs: frozenset[str]) -> "Gemma4Tap":
        attention = self.attention if needs & {"attention", "keys"} else None
        return Gemma4Tap(self.model, attention, _positions(modality, arguments), keep_keys="keys" in needs)

    def pack(self, modality: Modality, keeps: list[torch.Tensor], arguments: dict[str, Any]) -> list[torch.Tensor]:
        return [keep.flatten() for keep in keeps]  # frames in order, each in raster order


def _positions(modality: Modality, arguments: dict[str, Any]) -> torch.Tensor:
    positions = arguments.get(POSITIONS[modality.name])
    if positions is None:
        raise ValueError(f"{modality.encoder} needs {POSITIONS[modality.name]} (the processor returns them) to prune")
    return positions


class Gemma4Received(RotaryCapture):
    """Within a ``with`` block, records the attention each patch receives from the real patches of
    its image in a Gemma 4 encoder layer, with the layer's q/k norms and 2D rotary embedding, and
    its keys.

    After the layer ran: ``scores`` (n, N) float32 (0 at padding), ``keys`` (n, N, H * d) (0 at
    padding; None unless ``keep_keys``).
    """

    def __init__(self, attention: nn.Module, positions: torch.Tensor, keep_keys: bool) -> None:
        super().__init__(attention, projections=("q_norm", "k_norm"))
        self._positions = positions
        self._keep_keys = keep_keys
        self.scores: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def _score(self, query: torch.Tensor, keys: torch.Tensor) -> None:
        # The layer's own rotation of its (n, N, H, d) normalised projections.
        rotate = sys.modules[type(self.attention).__module__].apply_multidimensional_rope
        positions = self._positions.to(query.device)
        query, keys = (rotate(values, *self._rotary, positions) for values in (query, keys))
        keys = keys.repeat_interleave(query.shape[2] // keys.shape[2], dim=2)  # grouped-query heads
        real = (positions != -1).all(dim=-1)
        segments = torch.cat([real.new_zeros(1, dtype=torch.long), real.sum(dim=1).cumsum(0)])
        received = mean_attention_received(
            query[real].transpose(0, 1), keys[real].transpose(0, 1), self.attention.scaling, segments
        )
        self.scores = torch.zeros(real.shape, dtype=torch.float32, device=query.device).masked_scatter(real, received)
        self.keys = keys.flatten(2).masked_fill(~real.unsqueeze(-1), 0) if self._keep_keys else None


class Gemma4Tap:
    """The choice is made at the embedder's norm input: the (T, D) pooled features of all images
    of the call. The received attention and keys are captured per patch and pooled by the pooler's
    own pooling, padding dropped as it drops it."""

    def __init__(self, model: nn.Module, attention: nn.Module | None, positions: torch.Tensor, keep_keys: bool) -> None:
        embedder = model.model.embed_vision
        self.module = embedder.embedding_pre_projection_norm
        self._projection = embedder.embedding_projection
        self._pooler = model.model.vision_tower.pooler
        self._kernel = model.config.vision_config.pooling_kernel_size
        self._positions = positions
        self._capture = None if attention is None else Gemma4Received(attention, positions, keep_keys)
        self._stack = ExitStack()

    def __enter__(self) -> "Gemma4Tap":
        if self._capture is not None:
            self._stack.enter_context(self._capture)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def _pooled(self, values: torch.Tensor) -> torch.Tensor:
        """(n, N, K) per patch, 0 at padding -> (T, K) per token, as the pooler averages and strips."""
        length = values.shape[1] // self._kernel**2
        pooled, real = self._pooler._avg_pool_by_positions(values, self._positions.to(values.device), length)
        return pooled[real]

    def _captured(self) -> Gemma4Received | None:
        if self._capture is not None and self._capture.scores is None:
            raise RuntimeError("the vision encoder's last layer did not run inside the feature call")
        return self._capture

    def features(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return inputs[0]

    def attention(self) -> torch.Tensor | None:
        capture = self._captured()
        return None if capture is None else self._pooled(capture.scores.unsqueeze(-1))[:, 0]

    def keys(self) -> torch.Tensor | None:
        capture = self._captured()
        if capture is None or capture.keys is None:
            return None
        return self._pooled(capture.keys.float()).unflatten(-1, (-1, self._capture.attention.head_dim))

    def project(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # forward, not __call__: the pre-hook must not fire again for its own projection.
        return self._projection(self.module.forward(inputs[0]))

    def substitute(self, inputs: tuple[torch.Tensor, ...], features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return substitute_changed(self, inputs, features)  # the merged rows only


FAMILY = Family(
    name="Gemma 4",
    model_class=Gemma4ForConditionalGeneration,
    example="google/gemma-4-31B-it",
    vision=Gemma4Vision,
    modalities=(IMAGE, VIDEO),
    streams=("mm_token_type_ids", "per_layer_inputs"),
    passthrough=("input_features", "input_features_mask"),
    language_stage=(
        "its language model has sliding-window attention layers (and bidirectional attention among an "
        "image's tokens), which the LLM-stage cut does not handle"
    ),
)
