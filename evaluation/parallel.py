"""The evaluation's reference answers spread over worker processes, each with its own copy of the model.

Answers are independent per item, so `workers` processes (spawned, one torch thread each) take
chunks of the items in turn; the records come back in item order, the same as a single process
gives. Each worker holds a copy of the model: use it for small models (the embedded default), not
for a 7B checkpoint on a small machine.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from evaluation.evaluate import Record, ReferenceEvaluator

CHUNK = 20  # items a worker answers per task: small enough for a smooth progress bar

_WORKER: dict[str, Any] = {}


def _start_worker(load_model: Callable[[Any], tuple[Any, Any]], job: Any) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core
    model, processor = load_model(job)
    _WORKER["evaluator"] = ReferenceEvaluator(model, processor, job.config)
    _WORKER["items"] = job.items()


def _answer(start: int, stop: int) -> list[Record]:
    evaluator: ReferenceEvaluator = _WORKER["evaluator"]
    return [record for item in _WORKER["items"][start:stop] for record in evaluator.answer_item(item)]


def reference_records(
    load_model: Callable[[Any], tuple[Any, Any]],
    job: Any,
    count: int,
    workers: int,
    on_item: Callable[[int], None] | None = None,
) -> list[Record]:
    """Every record of the reference settings for the job's first `count` items, in item order.

    load_model(job) -> (model, processor) runs in each worker: a module-level function, which a spawned
    process imports by name (the caller passes it, so this module needs no import of the job's)."""
    bounds = [(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(load_model, job)
    ) as pool:
        futures = [pool.submit(_answer, start, stop) for start, stop in bounds]
        records: list[Record] = []
        for (_, stop), future in zip(bounds, futures, strict=True):
            records += future.result()
            if on_item is not None:
                on_item(stop)
    return records
