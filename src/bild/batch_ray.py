"""Files of prompts on Ray Data: one engine per worker, the same answers as :mod:`bild.batch`.

The driver reads and checks the file (every bad line named before any model loads) and skips the ids already in the
output, exactly as the local run does; the pending prompts become a Ray dataset, and ``map_batches`` runs a class UDF
(:class:`Answerer`) on a pool of ``workers`` actors, each loading the pair once. Answers stream back to the driver,
which appends each one to the output as it arrives (same rows, same statistics as the local run; the order may
differ), so an interrupted run resumes like a local one.

A prompt that the worker's tokenizer refuses (too long for the model, chat messages without a chat template) does not
stop the others: its row comes back with an ``error`` instead of an answer, and is reported at the end, not written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator

from bild.batch import AnswerWriter, BatchTotals, PromptRecord, answer_row
from bild.config import BiLDConfig, DraftCosts, GenerationResult, GenerationStats
from bild.extras import require

require("ray", "bild generate --ray")

import ray  # noqa: E402  (after the extra check)

STATS_FIELDS = tuple(f.name for f in fields(GenerationStats))


@dataclass(frozen=True)
class EngineSpec:
    """What a worker loads (plain strings: devices resolve on the worker's own node)."""

    large: str
    small: str | None
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    small_device: str | None = None
    threads: int | None = None  # torch CPU threads per worker
    chat: bool | None = None  # the chat template for lines that do not say; None: when the large model has one
    costs: DraftCosts | None = None  # fixed costs for the adaptive policy (None: each worker measures its own)


class Answerer:
    """The map_batches UDF: loads the pair once per worker, answers one batch of encoded prompt records."""

    def __init__(self, spec: EngineSpec, base: BiLDConfig) -> None:
        import torch

        from bild.decoding import BiLD
        from bild.models import load_pair

        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        pair = load_pair(spec.large, spec.small, device=spec.device, dtype=spec.dtype, device_map=spec.device_map,
                         small_device=spec.small_device)
        self.engine, self.base, self.chat = BiLD(pair, costs=spec.costs), base, spec.chat

    def __call__(self, batch: dict) -> dict:
        return {"row": [self._answer(json.loads(text)) for text in batch["record"]]}

    def _answer(self, fields_: dict) -> str:
        record = PromptRecord(id=fields_["id"], line=fields_["line"], prompt=fields_["prompt"],
                              settings=tuple(map(tuple, fields_["settings"])), chat=fields_["chat"])
        try:
            ids = self.engine.encode(record.prompt, self.chat if record.chat is None else record.chat)
        except ValueError as error:
            return json.dumps({"line": record.line, "error": str(error)})
        bild = self.engine.pair.small is not None
        result = (self.engine.generate_ids if bild else self.engine.vanilla_ids)(ids, record.config(self.base))
        return json.dumps({"line": record.line, "answer": answer_row(record, result, "bild" if bild else "vanilla")})


@dataclass(frozen=True)
class RayRun:
    """How the records are spread: worker actors, the CPUs and GPUs each reserves, the cluster to use."""

    workers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    address: str | None = None  # None: start a local Ray (and stop it again at the end)


def answer_on_ray(records: list[PromptRecord], spec: EngineSpec, base: BiLDConfig, writer: AnswerWriter,
                  run: RayRun = RayRun(), on_answer: Callable[[BatchTotals], None] | None = None
                  ) -> Iterator[BatchTotals]:
    """Answer ``records`` on Ray Data, writing each answer as it arrives; yields the totals after each one. Prompts
    the workers' tokenizer refused are in ``totals.refused`` (line -> message) at the end."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=run.address or "local", include_dashboard=False, logging_level="WARNING",
                 log_to_driver=False)
    try:
        rows = [{"record": json.dumps({"id": record.id, "line": record.line, "prompt": record.prompt,
                                       "settings": [list(item) for item in record.settings], "chat": record.chat})}
                for record in records]
        answers = ray.data.from_items(rows).map_batches(
            Answerer, fn_constructor_args=(spec, base), batch_size=1, concurrency=run.workers,
            num_cpus=run.num_cpus, num_gpus=run.num_gpus,
        )
        totals = RefusingTotals()
        for item in answers.iter_rows():
            row = json.loads(item["row"])
            if "error" in row:
                totals.refused[row["line"]] = row["error"]
                continue
            writer.write(row["answer"])
            totals.add(result_of(row["answer"]))
            yield totals
    finally:
        if started:
            ray.shutdown()


@dataclass
class RefusingTotals(BatchTotals):
    refused: dict[int, str] = field(default_factory=dict)  # input line -> why the worker's tokenizer refused it


def result_of(answer: dict) -> GenerationResult:
    """The GenerationResult an answer row was made from (the totals count its statistics)."""
    stats = GenerationStats(**{name: answer["stats"][name] for name in STATS_FIELDS})
    return GenerationResult(token_ids=answer["token_ids"], text=answer["text"], finish_reason=answer["finish_reason"],
                            stats=stats)
