"""Run methods side by side on one dataset and summarize quality, speed and BiLD statistics.

Honest timing on a noisy, shared machine: every method runs on example i before any method sees example i+1, in
an order rotated per example, after an untimed warm-up call of every method; all methods share the loaded models
and the same prompt tokens. speedup = total time of the baseline (``vanilla``) / total time of the method.
Per-example rows are appended to ``examples.jsonl`` as each example finishes, so an interrupted run keeps them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from bild.config import BiLDConfig
from bild.decoding import BiLD
from bild.eval import metrics
from bild.eval.datasets import EvalDataset, Example
from bild.eval.methods import Method, MethodContext, MethodOutput, Request, build_method
from bild.models import ModelPair

logger = logging.getLogger(__name__)

BASELINE = "vanilla"
ROWS_FILE = "examples.jsonl"  # per-example rows in an output directory
ProgressCallback = Callable[[int, int, dict[str, float]], None]  # (examples done, total, running speedups)


@dataclass(frozen=True)
class ExampleRecord:
    """One method's output on one example (a row of examples.jsonl)."""

    index: int
    id: str
    method: str
    output: str
    reference: str
    time_s: float
    new_tokens: int
    exact_match: bool  # equal to the baseline's output tokens
    stats: dict | None  # GenerationStats.as_dict() for bild-engine methods
    kind: str = ""  # the example's tag ("" when untagged)


@dataclass(frozen=True)
class MethodSummary:
    """One method over the whole run; the first eight fields are the issue's JSON shape, the rest are extras."""

    rougeL: float | None
    bleu: float | None
    time_s: float
    speedup: float
    tokens_per_s: float
    exact_match: float
    fallback_rate: float | None  # fallbacks per generated token
    rollback_rate: float | None  # rollbacks per generated token
    tokens_per_large_pass: float | None
    new_tokens: int
    mean_time_s: float
    large_passes: int | None
    small_steps: int | None  # small-model decoding steps: drafted tokens plus the ones dropped by a fallback
    small_time_s: float | None  # inside the small model's forward passes
    large_time_s: float | None  # inside the large model's forward passes
    overhead_s: float | None  # everything else: policies, sampling, cache crops, Python
    rep4: float | None = None  # seq-rep-4 of the outputs (bild.eval.metrics.repetition): 0 = no repeated 4-gram
    throughput_ratio: float = 0.0  # tokens/s over the baseline's tokens/s (lossy methods may write more or fewer)
    rougeL_vs_large: float | None = None  # ROUGE-L against the baseline's own outputs: how far a method strays


@dataclass
class EvalResult:
    dataset: str
    large: str
    small: str | None
    records: dict[str, list[ExampleRecord]]  # method -> one record per finished example
    config: BiLDConfig
    interrupted: bool = False
    summaries: dict[str, MethodSummary] = field(default_factory=dict)
    kind_summaries: dict[str, dict[str, MethodSummary]] = field(default_factory=dict)  # kind -> method -> summary

    @property
    def n(self) -> int:
        return len(self.records.get(BASELINE, []))

    def to_json(self) -> dict:
        """The summary in the issue's shape, with extra keys."""
        return {
            "dataset": self.dataset,
            "n": self.n,
            "large": self.large,
            "small": self.small,
            "methods": {name: asdict(summary) for name, summary in self.summaries.items()},
            "kinds": {kind: {name: asdict(summary) for name, summary in by_method.items()}
                      for kind, by_method in self.kind_summaries.items()},
            "config": {**asdict(self.config), "rollback_threshold": json_number(self.config.rollback_threshold)},
            "interrupted": self.interrupted,
        }


def evaluate(
    pair: ModelPair,
    dataset: EvalDataset,
    methods: list[str],
    config: BiLDConfig,
    out_dir: Path | None = None,
    warmup: int = 1,
    chat: bool | None = None,
    draft_window: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> EvalResult:
    """Build the named methods on one shared engine and run them side by side (see the module docstring)."""
    engine = BiLD(pair)
    context = MethodContext(pair=pair, engine=engine, config=config, **({"draft_window": draft_window} if draft_window else {}))
    names = [BASELINE] + [name for name in dict.fromkeys(methods) if name != BASELINE]
    built = {name: build_method(name, context) for name in names}
    return run_methods(pair, engine, dataset, built, config, out_dir, warmup, chat, on_progress)


def run_methods(
    pair: ModelPair,
    engine: BiLD,
    dataset: EvalDataset,
    methods: dict[str, Method],
    config: BiLDConfig,
    out_dir: Path | None = None,
    warmup: int = 1,
    chat: bool | None = None,
    on_progress: ProgressCallback | None = None,
    requests: list[Request] | None = None,
    append: bool = False,
) -> EvalResult:
    """Run already built methods (``methods`` must contain the baseline ``vanilla``), interleaved per example.

    requests: the examples' encoded prompts, when the caller encodes them itself (e.g. chat messages); default: each
    example's prompt through the dataset's template. append: add to ``out_dir``'s examples.jsonl instead of starting
    it afresh (a resumed run)."""
    if BASELINE not in methods:
        raise ValueError(f"the methods must include the baseline {BASELINE!r}")
    use_chat = pair.large.is_chat if chat is None else chat
    if requests is None:
        requests = [_request(engine, dataset.prompt(example), use_chat) for example in dataset.examples]
    elif len(requests) != len(dataset.examples):
        raise ValueError(f"{len(requests)} requests for {len(dataset.examples)} examples")
    result = EvalResult(
        dataset=dataset.name,
        large=pair.large.name,
        small=pair.small.name if pair.small else None,
        records={name: [] for name in methods},
        config=config,
    )
    rows = _open_rows(out_dir, append)
    names = list(methods)
    try:
        for request in requests[:warmup]:
            for name in names:
                methods[name](request)
        for index, (example, request) in enumerate(zip(dataset.examples, requests)):
            order = names[index % len(names) :] + names[: index % len(names)]
            outputs = {name: methods[name](request) for name in order}
            baseline_ids = outputs[BASELINE].token_ids
            for name in names:
                record = _record(index, example, name, outputs[name], baseline_ids)
                result.records[name].append(record)
                if rows is not None:
                    rows.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
            if rows is not None:
                rows.flush()
            if on_progress is not None:
                on_progress(index + 1, len(requests), running_speedups(result))
    except KeyboardInterrupt:
        result.interrupted = True
        logger.warning("interrupted after %d of %d examples", result.n, len(requests))
    finally:
        if rows is not None:
            rows.close()
    result.summaries = {name: summarize(result.records[name], result.records[BASELINE]) for name in names}
    kinds = sorted({record.kind for record in result.records[BASELINE]})
    if len(kinds) > 1:
        result.kind_summaries = {kind: _kind_summaries(result, names, kind) for kind in kinds}
    return result


def _kind_summaries(result: EvalResult, names: list[str], kind: str) -> dict[str, MethodSummary]:
    baseline = [record for record in result.records[BASELINE] if record.kind == kind]
    return {name: summarize([record for record in result.records[name] if record.kind == kind], baseline)
            for name in names}


def _request(engine: BiLD, prompt: str, chat: bool) -> Request:
    return Request(prompt=prompt, prompt_ids=engine.encode(prompt, chat=chat), chat=chat)


def _open_rows(out_dir: Path | None, append: bool = False):
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return (out_dir / ROWS_FILE).open("a" if append else "w", encoding="utf-8")


def _record(index: int, example: Example, name: str, output: MethodOutput, baseline_ids: list[int]) -> ExampleRecord:
    return ExampleRecord(
        index=index,
        id=example.id,
        kind=example.kind,
        method=name,
        output=output.text,
        reference=example.reference,
        time_s=output.time_s,
        new_tokens=len(output.token_ids),
        exact_match=output.token_ids == baseline_ids,
        stats=output.stats.as_dict() if output.stats is not None else None,
    )


def running_speedups(result: EvalResult) -> dict[str, float]:
    baseline_time = sum(record.time_s for record in result.records[BASELINE])
    return {
        name: baseline_time / total
        for name, records in result.records.items()
        if name != BASELINE and (total := sum(record.time_s for record in records)) > 0
    }


def summarize(records: list[ExampleRecord], baseline: list[ExampleRecord]) -> MethodSummary:
    """Quality, speed and BiLD statistics of one method against the baseline over the same examples."""
    n = len(records)
    predictions = [record.output for record in records]
    references = [record.reference for record in records]
    total_time = sum(record.time_s for record in records)
    baseline_time = sum(record.time_s for record in baseline[:n])
    new_tokens = sum(record.new_tokens for record in records)
    baseline_tokens = sum(record.new_tokens for record in baseline[:n])
    tokens_per_s = new_tokens / total_time if total_time > 0 else 0.0
    baseline_tokens_per_s = baseline_tokens / baseline_time if baseline_time > 0 else 0.0
    has_references = any(reference.strip() for reference in references)
    stats = [record.stats for record in records if record.stats is not None]
    has_stats = n > 0 and len(stats) == n

    def stat_sum(key: str) -> float:
        return sum(s[key] for s in stats)

    large_passes = int(stat_sum("large_passes")) if has_stats else None
    return MethodSummary(
        rougeL=metrics.rouge_l(predictions, references) if has_references else None,
        bleu=metrics.bleu(predictions, references) if has_references else None,
        time_s=total_time,
        speedup=baseline_time / total_time if total_time > 0 else 0.0,
        tokens_per_s=tokens_per_s,
        exact_match=sum(record.exact_match for record in records) / n if n else 0.0,
        fallback_rate=stat_sum("fallbacks") / new_tokens if has_stats and new_tokens else None,
        rollback_rate=stat_sum("rollbacks") / new_tokens if has_stats and new_tokens else None,
        tokens_per_large_pass=new_tokens / large_passes if large_passes else None,
        new_tokens=new_tokens,
        mean_time_s=total_time / n if n else 0.0,
        large_passes=large_passes,
        small_steps=int(stat_sum("small_steps")) if has_stats else None,
        small_time_s=stat_sum("small_time_s") if has_stats else None,
        large_time_s=stat_sum("large_time_s") if has_stats else None,
        overhead_s=total_time - stat_sum("small_time_s") - stat_sum("large_time_s") if has_stats else None,
        rep4=metrics.repetition(predictions),
        throughput_ratio=tokens_per_s / baseline_tokens_per_s if baseline_tokens_per_s > 0 else 0.0,
        rougeL_vs_large=metrics.rouge_l(predictions, [record.output for record in baseline[:n]]),
    )


def write_json(data: dict, path: Path) -> None:
    """Write JSON atomically: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def json_number(value: float) -> float | str:
    """JSON has no infinity: alpha_RB = inf is written as the string \"inf\"."""
    return value if value != float("inf") else "inf"
