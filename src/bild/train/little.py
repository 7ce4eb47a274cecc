"""`bild little`: build both default little models end to end (prompts -> calibration -> two trainings -> report).

The aligned variant is fine-tuned on the large model's greedy outputs (prediction alignment, :mod:`bild.train.align`); the
unaligned one, with the same architecture, initialisation, steps and batch size, on the real text's own tokens (the
docstring words each prompt was built from). Both are measured on the same held-out prompts: teacher-forced top-1
agreement with the large model's greedy tokens.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bild.drafters.little import build_little, load_little, merge_low_rank, save_little
from bild.drafters.quantize import draft_vocabulary
from bild.models import DEFAULT_LARGE, LoadedModel, load_model
from bild.train.align import (
    CalibrationConfig,
    CalibrationRecord,
    TrainConfig,
    TrainResult,
    agreement,
    encode_prompt,
    finetune,
    generate_calibration,
)
from bild.train.cost import measure_decode_cost
from bild.train.prompts import PromptExample, build_package_prompts, build_prompts, prompts_per_round
from bild.train.tasks import build_broad_prompts
from bild.train.sources import LICENSE, PACKAGE_LICENSES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LittleConfig:
    """Everything `make little` does, with the values the shipped weights were built with."""

    prompts: int = 3333  # instruction prompts: one per training-split stdlib docstring (more: second round of kinds)
    heldout_every: int = 10  # docstrings 0, 10, 20, ... (every round's prompts on them) give the agreement figures
    package: str = "torch"  # an installed package whose docstrings give more prompts (pinned by every set-up path)
    package_prompts: int = 0  # prompts about its docstrings, one per docstring, held out like the stdlib's
    broad_prompts: int = 4000  # prompts of ten kinds from the broad corpus (bild.train.tasks), every tenth held out
    init_layers: tuple[int, ...] = (0, 6, 12, 18, 24, 29)  # large-model layers the little model's layers start from
    delta_rank: int = 64  # > 0: those layers stay frozen and only low-rank deltas of this rank (and norms) are trained
    draft_vocab_size: int = 8192  # tokens the int8 drafting head keeps (bild.drafters.quantize.DraftHead), from training data
    seed: int = 0
    calibration: CalibrationConfig = CalibrationConfig(max_new_tokens=96, batch_size=48, top_k=16, max_input_tokens=320)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1.8, batch_size=8, learning_rate=2e-3, kl_weight=0.0, max_prompt_tokens=192, max_target_tokens=96,
        length_bucket=128))


@dataclass(frozen=True)
class VariantReport:
    variant: str
    train_records: int
    train_target_tokens: int
    steps: int
    first_loss: float
    final_loss: float
    train_seconds: float
    agreement_before: float  # the initialised, untrained little model
    agreement_after: float
    weights_mb: float
    agreement_package: float | None = None  # on the held-out prompts about the package's docstrings, if any
    agreement_broad: float | None = None  # on the held-out broad prompts, if any


@dataclass(frozen=True)
class HeldOut:
    stdlib: list[CalibrationRecord]  # prompts about held-out stdlib docstrings: the agreement figure of the report
    package: list[CalibrationRecord]  # prompts about held-out package docstrings (empty without package prompts)
    broad: list[CalibrationRecord] = field(default_factory=list)  # held-out broad prompts (empty without them)


@dataclass(frozen=True)
class LittleReport:
    config: dict
    text_source: str
    prompts: int
    calibration_records: int
    heldout_records: int
    heldout_target_tokens: int
    calibration_seconds: float  # this run's share (0 when the calibration file was already complete)
    large_decode_ms: float
    small_decode_ms: float
    decode_cost_ratio: float  # little / large per-token decode step, measured side by side
    variants: list[VariantReport]


def reference_records(large: LoadedModel, examples: list[PromptExample], config: LittleConfig,
                      per_round: int | None = None) -> list[CalibrationRecord]:
    """Unaligned training data: each training prompt with the real text as target (reference tokens, then EOS).

    Needs no calibration data, so the unaligned variant can train before (or while) the large model generates.
    ``per_round`` as in :func:`is_heldout`.
    """
    records = []
    for index, example in enumerate(examples):
        if is_heldout(index, config.heldout_every, per_round):
            continue
        prompt_ids = encode_prompt(large, example.prompt, config.calibration.max_input_tokens)
        target = large.tokenizer(example.reference, add_special_tokens=False)["input_ids"]
        target = target[: config.train.max_target_tokens - 1] + [large.eos_token_ids[0]]
        records.append(CalibrationRecord(index, example.prompt, prompt_ids, target))
    return records


def is_heldout(index: int, heldout_every: int, per_round: int | None = None) -> bool:
    """Prompt ``index`` is held out when its docstring's first-round position is a multiple of ``heldout_every``.

    By docstring, not by prompt: a later round's prompt about a held-out docstring stays held out, so no held-out text
    is ever trained on. Stable when ``--prompts`` changes. ``per_round``: prompts per round of the prompt list
    (default: the stdlib's, :func:`prompts_per_round`; the package prompts have one round, any value above the index).
    """
    return index % (per_round or prompts_per_round()) % heldout_every == 0


def split_by_index(records: list[CalibrationRecord], heldout_every: int, per_round: int | None = None
                   ) -> tuple[list, list]:
    """(train, held-out) records, split by :func:`is_heldout`."""
    train, heldout = [], []
    for record in records:
        (heldout if is_heldout(record.index, heldout_every, per_round) else train).append(record)
    return train, heldout


def training_draft_vocabulary(large: LoadedModel, records: list[CalibrationRecord], config: LittleConfig
                              ) -> torch.Tensor:
    """The draft vocabulary of a variant: its training targets' most frequent tokens, then its prompts', then EOS."""
    return draft_vocabulary((r.output_ids[: config.train.max_target_tokens] for r in records), config.draft_vocab_size,
                            context=(r.input_ids for r in records), always=large.eos_token_ids)


def evaluate_and_save(large: LoadedModel, variant: str, little: LoadedModel, result: TrainResult,
                      train_records: list[CalibrationRecord], heldout: HeldOut, config: LittleConfig,
                      out_dir: Path) -> VariantReport:
    """Held-out agreement of the untrained initialisation and of the trained model; save weights, vocabulary, report."""
    before = agreement(build_little(large, config.init_layers, config.delta_rank), heldout.stdlib, config.train)
    after = agreement(little, heldout.stdlib, config.train)
    on_package = agreement(little, heldout.package, config.train) if heldout.package else None
    on_broad = agreement(little, heldout.broad, config.train) if heldout.broad else None
    logger.info("%s: agreement %.3f -> %.3f (%d steps, %.0f s)", variant, before, after, result.steps, result.seconds)
    report = VariantReport(variant, len(train_records), result.train_tokens, result.steps, result.first_loss,
                           result.final_loss, result.seconds, before, after, 0.0, on_package, on_broad)
    vocab = training_draft_vocabulary(large, train_records, config)
    path = save_little(little, variant, config.init_layers, asdict(report), out_dir, config.delta_rank, vocab)
    report = replace(report, weights_mb=round(path.stat().st_size / 1e6, 2))
    save_little(little, variant, config.init_layers, asdict(report), out_dir, config.delta_rank, vocab)
    return report


def package_calibration_path(work_dir: Path, config: LittleConfig) -> Path:
    return work_dir / f"calibration-{config.package}.jsonl"


def broad_calibration_path(work_dir: Path) -> Path:
    return work_dir / "calibration-broad.jsonl"


def build_default_little(out_dir: Path, work_dir: Path, config: LittleConfig = LittleConfig(),
                         variants: tuple[str, ...] = ("aligned", "unaligned")) -> LittleReport:
    """The whole `make little` pipeline; the calibration files in ``work_dir`` make an interrupted run resumable.

    Order: unaligned training (real text, needs no calibration), calibration data (the stdlib prompts, then the
    package prompts), aligned training on both, then both variants are measured on the same held-out calibration
    records. Each variant writes its own ``<variant>.json`` report, so variants may also run as separate processes;
    ``little-report.json`` gathers every variant present in ``out_dir``.
    """
    torch.manual_seed(config.seed)
    large = load_model(DEFAULT_LARGE, device="cpu")  # the recipe trains on a CPU, in float32
    examples = build_prompts(config.prompts, seed=config.seed)
    package_examples = (build_package_prompts(config.package, config.package_prompts, seed=config.seed)
                        if config.package_prompts else [])
    package_round = config.package_prompts  # one round: every index is below it, so held out by index alone
    broad_examples = build_broad_prompts(config.broad_prompts, seed=config.seed) if config.broad_prompts else []
    broad_round = config.broad_prompts  # each prompt has its own text: held out by index alone, as the package's
    trained: dict[str, tuple[LoadedModel, TrainResult, list[CalibrationRecord]]] = {}
    if "unaligned" in variants:
        real_text = (reference_records(large, examples, config)
                     + reference_records(large, package_examples, config, per_round=package_round)
                     + reference_records(large, broad_examples, config, per_round=broad_round))
        little = build_little(large, config.init_layers, config.delta_rank)
        trained["unaligned"] = (little, finetune(little, real_text, config.train), real_text)
    started = time.perf_counter()
    records = _generated(large, examples, work_dir / "calibration.jsonl", config)
    package_records = (_generated(large, package_examples, package_calibration_path(work_dir, config), config)
                       if package_examples else [])
    broad_records = (_generated(large, broad_examples, broad_calibration_path(work_dir), config)
                     if broad_examples else [])
    calibration_seconds = time.perf_counter() - started
    train_records, heldout_stdlib = split_by_index(records, config.heldout_every)
    package_train, heldout_package = split_by_index(package_records, config.heldout_every, package_round)
    broad_train, heldout_broad = split_by_index(broad_records, config.heldout_every, broad_round)
    heldout = HeldOut(heldout_stdlib, heldout_package, heldout_broad)
    if "aligned" in variants:
        little = build_little(large, config.init_layers, config.delta_rank)
        aligned_records = train_records + package_train + broad_train
        trained["aligned"] = (little, finetune(little, aligned_records, config.train), aligned_records)
    for variant, (little, result, variant_records) in sorted(trained.items()):
        evaluate_and_save(large, variant, little, result, variant_records, heldout, config, out_dir)
    # as users get it (int8 drafting); with nothing trained (calibration only), the untrained fp32 architecture
    drafter = (load_little(min(trained), large, out_dir) if trained
               else merge_low_rank(build_little(large, config.init_layers, config.delta_rank)))
    cost = measure_decode_cost(large, drafter)
    source = f"docstrings of the Python standard library ({LICENSE}); eval-reserved modules excluded"
    if package_examples:
        source += f"; docstrings of {config.package} ({PACKAGE_LICENSES.get(config.package, 'see its license')})"
    if broad_examples:
        source += "; the broad corpus of Debian packages' text (bild.train.corpus.SOURCES, data/README.md)"
    report = LittleReport(
        config=json.loads(json.dumps(asdict(config))),
        text_source=source,
        prompts=len(examples) + len(package_examples) + len(broad_examples),
        calibration_records=len(records) + len(package_records) + len(broad_records),
        heldout_records=len(heldout.stdlib),
        heldout_target_tokens=sum(min(len(r.output_ids), config.train.max_target_tokens) for r in heldout.stdlib),
        calibration_seconds=calibration_seconds,
        large_decode_ms=cost.large_ms,
        small_decode_ms=cost.small_ms,
        decode_cost_ratio=cost.ratio,
        variants=_variant_reports(out_dir),
    )
    if trained:  # a calibration-only run leaves the shipped report alone
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "little-report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


def _generated(large: LoadedModel, examples: list[PromptExample], path: Path, config: LittleConfig
               ) -> list[CalibrationRecord]:
    """The large model's greedy outputs for the prompts (generated now or resumed from ``path``), non-empty only."""
    records = generate_calibration(large, [e.prompt for e in examples], path, config.calibration)
    return [record for record in records if record.output_ids]


def _variant_reports(out_dir: Path) -> list[VariantReport]:
    reports = []
    for variant in ("aligned", "unaligned"):
        path = out_dir / f"{variant}.json"
        if path.is_file():
            reports.append(VariantReport(**json.loads(path.read_text())["report"]))
    return reports
