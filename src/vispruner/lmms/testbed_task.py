"""A local lmms-eval task over the testbed's held-out questions, the ones ``vispruner eval`` asks.

``write_task(folder, n, seed)`` writes a parquet of ``held_out(n, seed)`` (scene PNG, question,
answer), the task YAML and the ``utils.py`` its ``!function`` entries name; then
``lmms-eval --model vispruner --model_args pretrained=testbed ... --tasks vispruner_testbed
--include_path folder`` runs offline. Scoring is ``vispruner eval``'s: the reply's first word,
lower-cased, without punctuation, must equal the answer.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

TASK = "vispruner_testbed"
#: vispruner eval's default for the testbed: every answer is one token.
MAX_NEW_TOKENS = 1

YAML = """\
task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["</s>"]
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
UTILS = "from vispruner.lmms.testbed_task import doc_to_text, doc_to_visual, process_results  # noqa: F401\n"


def write_task(folder: str | Path, n: int = 200, seed: int = 0, task: str = TASK) -> Path:
    """Write the task for ``held_out(n, seed)`` into ``folder`` (created); returns the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vispruner.testbed.scenes import held_out

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples = held_out(n, seed)
    images = []
    for sample in samples:
        buffer = io.BytesIO()
        sample.scene.render().save(buffer, format="PNG")
        images.append(buffer.getvalue())
    table = pa.table(
        {
            "image": images,
            "question": [s.question.text for s in samples],
            "answer": [s.question.answer for s in samples],
            "kind": [s.question.kind for s in samples],
        }
    )
    parquet = folder / f"{task}.parquet"
    pq.write_table(table, parquet)
    (folder / f"{task}.yaml").write_text(YAML.format(task=task, parquet=parquet.resolve(), max_new_tokens=MAX_NEW_TOKENS))
    (folder / "utils.py").write_text(UTILS)
    return folder


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(doc["image"])).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    from vispruner.eval.answering import normalise

    return {"accuracy": float(normalise(results[0]) == doc["answer"])}
