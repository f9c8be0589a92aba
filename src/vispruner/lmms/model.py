"""The lmms-eval model: any checkpoint :func:`vispruner.apply` supports, pruned as ``--model_args`` say.

Data-parallel the way lmms-eval expects: launched with ``accelerate launch --num_processes N -m
lmms_eval``, each process loads one model on its own device and answers the shard of requests
that lmms-eval gives its rank; lmms-eval gathers the results.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from .arguments import parse_model_args
from .inference import Generation, Visuals, batches, generate, loglikelihoods, split_visuals
from .loading import check_checkpoint, load


class VisPruner(lmms):
    """``lmms-eval --model vispruner --model_args pretrained=ID,method=vispruner,num_tokens=64,...``

    ``pretrained`` is ``testbed`` or ``testbed-qwen`` (the bundled models), a path or a hub id of any family that
    :func:`vispruner.apply` supports (read from its config); ``method=none`` evaluates it
    unpruned. Every other key is an :func:`vispruner.apply` argument (``num_tokens``,
    ``keep_ratio``, ``important_ratio``, ``budget``, the method's options) or ``dtype``,
    ``device_map``, ``attn_implementation``, ``max_frames_num``; all are checked before loading.
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, **model_args: Any) -> None:
        super().__init__()
        args = parse_model_args({"pretrained": pretrained, **model_args})
        from accelerate import Accelerator

        accelerator = Accelerator()
        if args.device_map is not None and accelerator.num_processes > 1:
            raise ValueError(
                f"model_args device_map places one model over devices; run one process with it, not {accelerator.num_processes}"
            )
        check_checkpoint(args)
        device = accelerator.device if accelerator.num_processes > 1 or args.device is None else args.device
        self._model, self.processor = load(args, device)
        self.args = args
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes

    @property
    def model(self) -> Any:
        return self._model

    @property
    def device(self) -> Any:
        return self._model.device

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    def _visuals(self, doc_to_visual: Callable[[Any], Any] | None, task: str, split: str, doc_id: int) -> Visuals:
        found = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        return split_visuals(found, self.args.max_frames_num)

    def _run(self, requests: Sequence[Any], keys: list[Any], lengths: list[int], step: Callable[[list[int]], list[Any]]) -> list[Any]:
        results: list[Any] = [None] * len(requests)
        with tqdm(total=len(requests), disable=self.rank != 0, desc="vispruner") as bar:
            for batch in batches(keys, lengths, self.batch_size):
                for index, result in zip(batch, step(batch)):
                    results[index] = result
                bar.update(len(batch))
        return results

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [request.args for request in requests]
        eos = self.processor.tokenizer.eos_token or ""

        def step(batch: list[int]) -> list[str]:
            generation = Generation.from_task(dict(args[batch[0]][1]), eos)
            items = [(args[i][0], self._visuals(args[i][2], args[i][4], args[i][5], args[i][3])) for i in batch]
            return generate(self.model, self.processor, items, generation)

        keys = [json.dumps(a[1], sort_keys=True, default=str) for a in args]
        return self._run(requests, keys, [len(a[0]) for a in args], step)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        args = [request.args for request in requests]

        def step(batch: list[int]) -> list[tuple[float, bool]]:
            items = []
            for i in batch:
                context, target, doc_to_visual, doc_id, task, split = args[i]
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                items.append((context, continuation, self._visuals(doc_to_visual, task, split, doc_id)))
            return loglikelihoods(self.model, self.processor, items)

        return self._run(requests, [0] * len(args), [len(a[0]) for a in args], step)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request's replies, one per round; the task's ``doc_to_text`` gives the next round's
        visuals and context from the replies so far, and says when to stop."""
        eos = self.processor.tokenizer.eos_token or ""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="vispruner"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            generation = Generation.from_task(dict(gen_kwargs), eos)
            doc = self.task_dict[task][split][doc_id]
            visuals, replies, info, round_index = doc_to_visual(doc), [], None, 0
            while True:
                items = [(context, split_visuals(visuals, self.args.max_frames_num))]
                replies.append(generate(self.model, self.processor, items, generation)[0])
                round_index += 1
                visuals, context, done, replies, info = doc_to_text(
                    doc, previous_output=replies, round_idx=round_index, previous_round_info=info
                )
                replies = list(replies)
                if done:
                    break
            results.append(replies)
        return results
