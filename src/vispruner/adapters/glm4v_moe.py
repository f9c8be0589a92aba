"""GLM-4.5V (``Glm4vMoeForConditionalGeneration``): GLM-4.1V's tower, processor layout and positions
before a mixture-of-experts language model.

Every answer of :mod:`.glm4v` holds (signal, features, unit, order, positions, streams, and what
is refused). The language model's router scores each token on its own (sigmoid, top-k within
groups), so dropping visual tokens changes no other token's experts; its softmax attention in
every layer (partial rotary) serves FastV.
"""

from __future__ import annotations

from dataclasses import replace

from transformers import Glm4vMoeForConditionalGeneration

from .glm4v import FAMILY as GLM4V

FAMILY = replace(GLM4V, name="GLM-4.5V", model_class=Glm4vMoeForConditionalGeneration, example="zai-org/GLM-4.5V")
