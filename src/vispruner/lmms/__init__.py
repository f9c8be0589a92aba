"""lmms-eval plugin: ``lmms-eval --model vispruner --model_args pretrained=...,method=...``.

lmms-eval 0.7.x builds its model registry from the ``lmms_eval.models`` entry-point group (declared
in pyproject.toml), calling :func:`manifest` at start-up; this module stays import-light because
every lmms-eval run imports it, whatever model it evaluates. The model class is
:class:`vispruner.lmms.model.VisPruner`; docs/eval.md has the commands.
"""

from __future__ import annotations

from typing import Any

#: The name users give to ``lmms-eval --model``.
MODEL_ID = "vispruner"


def manifest() -> Any:
    """The ``ModelManifest`` that registers :class:`~vispruner.lmms.model.VisPruner` with lmms-eval."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="vispruner.lmms.model.VisPruner")
