"""What the training code needs to know of each testbed architecture.

The stages (:mod:`vispruner.testbed.train`) are the same for both: stage 1 trains the tower with
heads on a pooled summary and on each of the 8 x 8 cells the language model will see; stage 3
trains the projector and the language model on frozen, cached tower features. An architecture
says how it is built and saved, where those features come from, how the projector maps them and
which positions the language model gives the (possibly partial) image tokens; its ``recipe``
holds where its training departs from ``train()``'s defaults (the Qwen decoder, for one, starts
from the LLaVA testbed's).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from . import model as llava
from . import qwen
from .scenes import Scene


class Llava:
    """The LLaVA testbed: CLIP tower with [CLS], MLP projector, 1D positions."""

    weights = llava.WEIGHTS
    #: Departures from train()'s default recipe: none, the defaults are this testbed's.
    recipe: dict[str, Any] = {}

    def build(self, seed: int) -> tuple[Any, Any]:
        processor = llava.build_processor()
        return llava.build_model(processor, seed), processor

    def save(self, model: Any, processor: Any, out: Path) -> None:
        model.save_pretrained(out)
        llava.save_tower_for_vllm(out)
        processor.save_pretrained(out)

    def pixels(self, processor: Any, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        """The tower's inputs exactly as the processor makes them at inference."""
        return {"pixel_values": processor.image_processor([s.render() for s in scenes], return_tensors="pt")["pixel_values"]}

    def tower(self, model: Any) -> torch.nn.Module:
        return model.model.vision_tower

    def cell_width(self, model: Any) -> int:
        return self.tower(model).config.hidden_size

    def tower_outputs(self, model: Any, pixels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C) [CLS] summary and (B, 64, C) patch states of the last layer, for the stage-1 heads."""
        out = self.tower(model)(**pixels)
        return out.pooler_output, out.last_hidden_state[:, 1:]

    def image_features(self, model: Any, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 64, C) patch states at the layer the projector reads."""
        out = self.tower(model)(**pixels, output_hidden_states=True)
        return out.hidden_states[model.config.vision_feature_layer][:, 1:]

    def projector(self, model: Any) -> torch.nn.Module:
        return model.model.multi_modal_projector

    def project(self, model: Any, features: torch.Tensor) -> torch.Tensor:
        return self.projector(model)(features)

    def image_token_id(self, model: Any) -> int:
        return model.config.image_token_index

    def positions(self, model: Any, full_ids: torch.Tensor, full_mask: torch.Tensor, columns: torch.Tensor) -> None:
        """None: the language model numbers the tokens it is given 0, 1, 2, ..."""
        return None


class Qwen:
    """The Qwen testbed: windowed tower without [CLS], 2 x 2 patch merger, M-RoPE positions."""

    weights = qwen.WEIGHTS
    #: Departures from train()'s default recipe: its tower sees 4x the patches, so stage 1 takes
    #: smaller batches; its decoder starts from the LLaVA testbed's, as LLaVA starts from a
    #: pretrained language model (from random weights, the LLaVA recipe plateaus at 49%).
    recipe: dict[str, Any] = {"tower_steps": 2000, "batch": 16, "train_scenes": 12000, "language_init": "testbed"}

    def build(self, seed: int) -> tuple[Any, Any]:
        processor = qwen.build_processor()
        return qwen.build_model(processor, seed), processor

    def save(self, model: Any, processor: Any, out: Path) -> None:
        model.save_pretrained(out)
        qwen.save_processor(processor, out)

    def pixels(self, processor: Any, scenes: list[Scene]) -> dict[str, torch.Tensor]:
        out = processor.image_processor([s.render() for s in scenes], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "grid_thw": out["image_grid_thw"]}

    def tower(self, model: Any) -> torch.nn.Module:
        return model.model.visual

    def cells(self, model: Any, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 64, 4 C): the last block's states of the 2 x 2 patches each merged token fuses (the
        merger's input), in raster order of the merged tokens (the blocks work in window order)."""
        from transformers.vision_utils import get_vision_window_index

        visual = self.tower(model)
        config = visual.config
        states = visual(pixels["pixel_values"], grid_thw=pixels["grid_thw"]).last_hidden_state
        window_index, _ = get_vision_window_index(
            pixels["grid_thw"], config.spatial_merge_size, config.window_size, config.patch_size
        )
        units = states.view(-1, visual.spatial_merge_unit * config.hidden_size)[torch.argsort(window_index)]
        return units.view(len(pixels["grid_thw"]), qwen.NUM_TOKENS, -1)

    def cell_width(self, model: Any) -> int:
        return self.tower(model).spatial_merge_unit * self.tower(model).config.hidden_size

    def tower_outputs(self, model: Any, pixels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 4 C) mean over the image (there is no [CLS]) and the (B, 64, 4 C) cells."""
        cells = self.cells(model, pixels)
        return cells.mean(1), cells

    def image_features(self, model: Any, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.cells(model, pixels)

    def projector(self, model: Any) -> torch.nn.Module:
        return model.model.visual.merger

    def project(self, model: Any, features: torch.Tensor) -> torch.Tensor:
        """(B, 64, H): the stock merger on (B, 64, 4 C) cells."""
        width = self.tower(model).config.hidden_size
        return self.projector(model)(features.reshape(-1, width)).view(*features.shape[:2], -1)

    def image_token_id(self, model: Any) -> int:
        return model.config.image_token_id

    def positions(
        self, model: Any, full_ids: torch.Tensor, full_mask: torch.Tensor, columns: torch.Tensor
    ) -> torch.Tensor:
        """(3, B, L) M-RoPE positions: computed by the model on the full rows (all 64 image tokens)
        and gathered at ``columns`` (B, L), so that kept image tokens keep their (row, column)."""
        image = (full_ids == self.image_token_id(model)).int()
        side = math.isqrt(qwen.NUM_TOKENS) * qwen.MERGE_SIZE  # patches per row, before merging
        grid = torch.tensor([[1, side, side]] * len(full_ids))
        positions, _ = model.model.get_rope_index(full_ids, image, grid, attention_mask=full_mask)
        return positions.gather(2, columns[None].expand(3, -1, -1))


ARCHITECTURES = {"llava": Llava(), "qwen": Qwen()}
