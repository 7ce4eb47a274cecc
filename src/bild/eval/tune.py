"""`bild tune`: pick alpha_FB, alpha_RB, N and the policy for one pair on the user's own prompts.

Every grid point runs side by side with the large model alone on each prompt (the harness: interleaved, rotated,
one warm-up), then the fastest point that keeps the quality bound wins:

- ``max_loss == 0``: every output equal, token for token, to the large model's own greedy output;
- ``max_loss > 0``: ROUGE-L of the outputs against the large model's own outputs at least ``100 - max_loss``.

Speed is the latency ratio over the large model alone (its total time over the point's). When no point that keeps
the bound is faster than the large model alone, the pick is the large model alone (``small = "none"``).

A run keeps its rows in a work directory (``run.json``: what was asked; ``examples.jsonl``: one row per method and
prompt, written as each prompt finishes). Run the same command again after an interruption and it answers only the
prompts not yet done; a work directory from other settings is refused, never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bild.config import BiLDConfig, DraftCosts
from bild.decoding import BiLD
from bild.eval.datasets import EvalDataset, Example
from bild.eval.harness import (
    BASELINE, ROWS_FILE, ExampleRecord, MethodSummary, ProgressCallback, json_number, run_methods, summarize, write_json,
)
from bild.eval.methods import MethodContext, Request, bild_method, build_method
from bild.models import ModelPair

RUN_FILE = "run.json"
COSTS_FILE = "costs.json"  # the costs the adaptive policy planned with: a resumed run plans with them too
POLICIES = ("adaptive", "fixed")


class TuneError(ValueError):
    """Bad tune settings, or a work directory that belongs to another run."""


@dataclass(frozen=True)
class TunePoint:
    """One candidate setting."""

    policy: str
    max_small_steps: int
    fallback_threshold: float
    rollback_threshold: float

    @property
    def label(self) -> str:
        return (f"{self.policy} N={self.max_small_steps} fb={self.fallback_threshold:g} "
                f"rb={self.rollback_threshold:g}")

    def config(self, base: BiLDConfig) -> BiLDConfig:
        return replace(base, **asdict(self))  # the fields are BiLDConfig's own


@dataclass(frozen=True)
class TuneGrid:
    """Every combination of the four lists is a point. The default: both policies, the paper's N, alpha_FB from
    cautious to eager, and alpha_RB from lossless (0) over the paper's range."""

    policies: tuple[str, ...] = POLICIES
    max_small_steps: tuple[int, ...] = (10,)
    fallback_thresholds: tuple[float, ...] = (0.4, 0.6, 0.8)
    rollback_thresholds: tuple[float, ...] = (0.0, 2.0, 5.0)

    def __post_init__(self) -> None:
        for name in ("policies", "max_small_steps", "fallback_thresholds", "rollback_thresholds"):
            if not getattr(self, name):
                raise TuneError(f"the grid's {name.replace('_', ' ')} are empty")
        for point in self.points():  # BiLDConfig names the first bad value
            try:
                point.config(BiLDConfig())
            except ValueError as error:
                raise TuneError(str(error)) from None

    def points(self) -> list[TunePoint]:
        return [TunePoint(policy, steps, fallback, rollback)
                for policy in dict.fromkeys(self.policies) for steps in dict.fromkeys(self.max_small_steps)
                for fallback in dict.fromkeys(self.fallback_thresholds)
                for rollback in dict.fromkeys(self.rollback_thresholds)]


@dataclass(frozen=True)
class PointResult:
    point: TunePoint
    summary: MethodSummary
    keeps_bound: bool


@dataclass(frozen=True)
class TuneResult:
    points: tuple[PointResult, ...]
    vanilla: MethodSummary
    n: int  # prompts every point ran on (finished before, in an earlier run, included)
    total: int  # prompts asked for
    max_loss: float
    interrupted: bool
    costs: DraftCosts | None = None  # what the adaptive policy planned with (None: no adaptive point has run)

    @property
    def pick(self) -> PointResult | None:
        """The fastest point that keeps the bound, if it is faster than the large model alone; else None."""
        best = max((result for result in self.points if result.keeps_bound),
                   key=lambda result: result.summary.speedup, default=None)
        return best if best is not None and best.summary.speedup > 1.0 else None

    def settings(self, large: str, small: str, base: BiLDConfig) -> dict:
        """The settings file: the pair, the picked decoding settings, and what was measured (under "tuned")."""
        pick = self.pick
        chosen = pick.point.config(base) if pick else base
        decoding = {"policy": chosen.policy, "max_small_steps": chosen.max_small_steps,
                    "fallback_threshold": chosen.fallback_threshold,
                    "rollback_threshold": json_number(chosen.rollback_threshold), "repeat_ngram": chosen.repeat_ngram}
        measured = {"prompts": self.n, "max_new_tokens": base.max_new_tokens, "max_loss": self.max_loss,
                    "bound": "identical to the large model alone" if self.max_loss == 0
                    else f"ROUGE-L against the large model's outputs >= {100 - self.max_loss:g}",
                    "pick": pick.point.label if pick else "the large model alone: no point that keeps the bound was faster",
                    "points": [_point_row(result) for result in self.points]}
        adaptive = pick is not None and chosen.policy == "adaptive"
        costs = {"costs": self.costs.as_dict()} if self.costs is not None and adaptive else {}
        return {"large": large, "small": small if pick else "none", **decoding, **costs, "tuned": measured}


def _point_row(result: PointResult) -> dict:
    summary = result.summary
    return {"label": result.point.label, **asdict(result.point),
            "rollback_threshold": json_number(result.point.rollback_threshold), "keeps_bound": result.keeps_bound,
            "speedup": summary.speedup, "throughput_ratio": summary.throughput_ratio,
            "rougeL_vs_large": summary.rougeL_vs_large, "exact_match": summary.exact_match,
            "tokens_per_large_pass": summary.tokens_per_large_pass}


def check_max_loss(max_loss: float) -> None:
    if not 0 <= max_loss <= 100:  # NaN fails too
        raise TuneError(f"max loss must be in [0, 100] ROUGE-L points, got {max_loss:g}")


def keeps_bound(summary: MethodSummary, max_loss: float) -> bool:
    if max_loss == 0:
        return summary.exact_match == 1.0
    return summary.rougeL_vs_large is not None and summary.rougeL_vs_large >= 100.0 - max_loss


def tune(
    pair: ModelPair,
    examples: list[Example],
    prompts: list,
    grid: TuneGrid,
    config: BiLDConfig,
    max_loss: float,
    work_dir: Path,
    run_key: dict,
    chat: bool | None = None,
    warmup: int = 1,
    on_progress: ProgressCallback | None = None,
) -> TuneResult:
    """Run the grid on the prompts not yet done in ``work_dir`` and pick (see the module docstring).

    examples: one per prompt (``id`` unique, ``reference`` may be empty); prompts: each a string or chat messages.
    run_key: what identifies the run (models, prompts, grid, settings); a work directory holding another is refused.
    """
    check_max_loss(max_loss)
    if len(examples) != len(prompts) or not examples:
        raise TuneError("tune needs at least one prompt")
    points = grid.points()
    labels = [BASELINE] + [point.label for point in points]
    done = _resume(work_dir, run_key, labels)
    engine = BiLD(pair, costs=_kept_costs(work_dir))  # resumed: plan with the costs the earlier rows were run with
    context = MethodContext(pair=pair, engine=engine, config=config)
    methods = {BASELINE: build_method(BASELINE, context)}
    methods |= {point.label: bild_method(context, **asdict(point)) for point in points}

    todo = [index for index, example in enumerate(examples) if example.id not in done]
    use_chat = pair.large.is_chat if chat is None else chat
    requests = [Request(prompt=str(prompts[index]), prompt_ids=engine.encode(prompts[index], chat=use_chat),
                        chat=use_chat) for index in todo]
    dataset = EvalDataset(name="tune", examples=tuple(examples[index] for index in todo), prompt_template="{source}",
                          metric="rougeL")

    def progress(finished: int, _total: int, speedups: dict[str, float]) -> None:
        if on_progress is not None:
            on_progress(len(done) + finished, len(examples), speedups)

    evaluation = run_methods(pair, engine, dataset, methods, config, out_dir=work_dir, warmup=warmup if todo else 0,
                             chat=use_chat, on_progress=progress, requests=requests, append=True)
    if engine.costs is not None:
        write_json(engine.costs.as_dict(), work_dir / COSTS_FILE)
    fresh: dict[str, dict[str, ExampleRecord]] = {}
    for label in labels:
        for record in evaluation.records[label]:
            fresh.setdefault(record.id, {})[label] = record
    records = {label: [] for label in labels}
    for example in examples:  # earlier rows and this run's, in the prompts' order
        rows = done.get(example.id) or fresh.get(example.id, {})
        if set(rows) == set(labels):
            for label in labels:
                records[label].append(rows[label])
    vanilla = summarize(records[BASELINE], records[BASELINE])
    results = []
    for point in points:
        summary = summarize(records[point.label], records[BASELINE])
        results.append(PointResult(point, summary, keeps_bound(summary, max_loss)))
    return TuneResult(points=tuple(results), vanilla=vanilla, n=len(records[BASELINE]), total=len(examples),
                      max_loss=max_loss, interrupted=evaluation.interrupted, costs=engine.costs)


def _kept_costs(work_dir: Path) -> DraftCosts | None:
    """The costs an earlier part of this run planned with, if it kept any (see :data:`COSTS_FILE`)."""
    try:
        return DraftCosts.from_dict(json.loads((work_dir / COSTS_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError):  # none kept (no adaptive point has run yet), or unreadable: time the pair again
        return None


def check_work_dir(work_dir: Path, run_key: dict) -> bool:
    """True when ``work_dir`` holds an earlier run of ``run_key`` (to resume), False when it holds none; a
    :class:`TuneError` when it holds a run of other settings. Writes nothing: call it before loading models."""
    run_file = work_dir / RUN_FILE
    if not run_file.exists():
        return False
    try:
        held = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TuneError(f"work directory {str(work_dir)!r}: cannot read {RUN_FILE}: {error}") from None
    key = json.loads(json.dumps(run_key, allow_nan=False))  # as it would be read back (tuples become lists)
    if not isinstance(held, dict) or held != key:
        held = held if isinstance(held, dict) else {}
        changed = sorted(name for name in set(held) | set(key) if held.get(name) != key.get(name))
        raise TuneError(f"work directory {str(work_dir)!r} holds a tune run with other settings "
                        f"({', '.join(changed)}); give another --work-dir or delete it")
    return True


def _resume(work_dir: Path, run_key: dict, labels: list[str]) -> dict[str, dict[str, ExampleRecord]]:
    """The finished prompts of an earlier run of the same key (id -> method -> record). Starts the directory when
    it is new; refuses one that holds another run; drops rows of unfinished prompts (and a torn last line)."""
    run_file, rows_file = work_dir / RUN_FILE, work_dir / ROWS_FILE
    if not check_work_dir(work_dir, run_key):
        work_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_key, run_file)
        for stale in (rows_file, work_dir / COSTS_FILE):
            stale.unlink(missing_ok=True)
    done: dict[str, dict[str, ExampleRecord]] = {}
    if rows_file.exists():
        for line in rows_file.read_text(encoding="utf-8").splitlines():
            try:
                record = ExampleRecord(**json.loads(line))
            except (ValueError, TypeError):  # a torn last line: that prompt runs again
                continue
            done.setdefault(record.id, {})[record.method] = record
        done = {key: rows for key, rows in done.items() if set(rows) == set(labels)}
        kept = [json.dumps(asdict(record), ensure_ascii=False) for rows in done.values() for record in rows.values()]
        _write_atomically(rows_file, "".join(line + "\n" for line in kept))
    return done


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def prompts_digest(prompts: list) -> str:
    """A short fingerprint of the prompts, so that a work directory is only resumed on the same ones."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
