"""`bild early-exit train`: train the exit block of the default large model and measure agreement and cost per k.

Distillation on the large model's greedy outputs, reusing the little models' calibration data (`bild little` writes
``build/little/calibration.jsonl``: instruction prompts from training-split stdlib docstrings) and their split (held
out: prompt index % 10 == 0) and the alignment helpers (:func:`bild.train.align.finetune`, :func:`bild.train.align.agreement`).
Only the exit block is trained; the large model's weights are frozen, so its outputs are unchanged.

For each candidate k the report gives the held-out top-1 agreement (teacher-forced on the large model's greedy
tokens) of: the bare exit (final norm + head after layer k), the exit block as initialised, and the trained block;
and the per-token draft cost relative to a full large decode step, measured side by side in one run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from bild.train.align import CalibrationRecord, TrainConfig, agreement, finetune, read_calibration
from bild.cache import CachedDecoder
from bild.drafters import WEIGHTS_DIR
from bild.drafters.early_exit import (
    EarlyExitModel,
    ExitSpec,
    early_exit_model,
    make_exit_block,
    save_exit,
    shared_decoders,
)
from bild.train.little import split_by_index
from bild.models import DEFAULT_LARGE, LoadedModel, load_model

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION = Path("build/little/calibration.jsonl")


@dataclass(frozen=True)
class ExitTrainConfig:
    exit_layers: tuple[int, ...] = (2, 4, 6, 8)  # candidate k: the drafter runs layers [0, k)
    ship_layer: int | None = 4  # the k whose trained block is saved (None: save nothing)
    init_from: str = "last"  # the exit block starts as a copy of the large model's "last" layer or the "next" one (k)
    heldout_every: int = 10  # the little models' split: prompts 0, 10, 20, ... are held out
    max_train_records: int | None = None  # use the first N training records (quick sweeps)
    max_heldout_records: int | None = 100
    resume_from: Path | None = None  # continue from a saved block (``save_exit`` output) instead of the init layer
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1.0, batch_size=8, learning_rate=5e-4, kl_weight=0.0, max_prompt_tokens=192, max_target_tokens=96))


@dataclass(frozen=True)
class LayerReport:
    exit_layer: int
    init_layer: int
    agreement_bare: float  # final norm + head right after layer k-1, nothing trained
    agreement_init: float  # with the exit block as initialised (a copy of layer init_layer)
    agreement_trained: float
    steps: int
    first_loss: float
    final_loss: float
    train_seconds: float
    draft_ms: float  # one draft step (layers [0, k) + exit block + head), single token, with cache
    large_ms: float  # one full large decode step, measured in the same rounds
    cost_ratio: float  # draft_ms / large_ms


@dataclass(frozen=True)
class ExitTrainReport:
    calibration_file: str
    train_records: int
    heldout_records: int
    heldout_target_tokens: int
    layers: list[LayerReport]
    shipped_layer: int | None
    resumed_from: dict | None = None  # the report saved with the block training continued from (its history)


def _frozen(large: LoadedModel) -> None:
    """Keep the large model as it is: no gradients for any of its weights."""
    for parameter in large.model.parameters():
        parameter.requires_grad_(False)


@torch.inference_mode()
def _steps_ms(forward, prompt: list[int], steps: int) -> float:
    """Mean time of one single-token step of a decoder after a prefill of ``prompt``."""
    tokens = list(prompt)
    tokens.append(int(forward(tokens, keep=1)[-1].argmax()))  # prefill
    started = time.perf_counter()
    for _ in range(steps):
        tokens.append(int(forward(tokens, keep=1)[-1].argmax()))
    return (time.perf_counter() - started) * 1000 / steps


def measure_step_costs(large: LoadedModel, drafters: dict[str, LoadedModel], steps: int = 32, rounds: int = 5,
                       prompt_len: int = 64, seed: int = 0) -> dict[str, float]:
    """ms per single-token decode step of the large model ("large") and each drafter, through the engine's own
    decoders (an early exit through its shared-cache draft decoder), interleaved rounds, warm-up excluded, min."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, large.model.config.vocab_size, (prompt_len,), generator=generator).tolist()

    def decoder(loaded: LoadedModel):
        if loaded.make_decoders is not None:
            return loaded.make_decoders(large, None)[0]
        return CachedDecoder(loaded.model)

    runners = {"large": large, **drafters}
    for loaded in runners.values():  # warm-up
        _steps_ms(decoder(loaded).forward, prompt, 2)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, loaded in runners.items():
            times[name].append(_steps_ms(decoder(loaded).forward, prompt, steps))
    return {name: min(values) for name, values in times.items()}


def measure_draft_cost(large: LoadedModel, model: EarlyExitModel, steps: int = 32, rounds: int = 5) -> tuple[float, float]:
    """(draft ms, large ms) per single-token step, measured side by side."""
    costs = measure_step_costs(large, {"draft": early_exit_model(large, model, "draft")}, steps, rounds)
    return costs["draft"], costs["large"]


def train_layer(large: LoadedModel, exit_layer: int, train_records: list[CalibrationRecord],
                heldout: list[CalibrationRecord], config: ExitTrainConfig) -> tuple[LayerReport, EarlyExitModel]:
    """Bare, initialised and trained agreement, and the draft cost, for one k; returns the trained model too."""
    last = large.model.config.num_hidden_layers - 1
    init_layer = {"last": last, "next": exit_layer}[config.init_from]
    bare = early_exit_model(large, EarlyExitModel(large.model, exit_layer), f"early-exit:{exit_layer}")
    model = EarlyExitModel(large.model, exit_layer, make_exit_block(large.model, init_layer))
    if config.resume_from is not None:
        saved = json.loads(config.resume_from.with_suffix(".json").read_text())
        if (saved["exit_layer"], saved["init_layer"]) != (exit_layer, init_layer):
            raise ValueError(f"{config.resume_from} is an exit at k={saved['exit_layer']} from layer "
                             f"{saved['init_layer']}, not k={exit_layer} from layer {init_layer}")
        model.exit_block.load_state_dict({name: t.float() for name, t in load_file(config.resume_from).items()})
    drafter = early_exit_model(large, model, f"early-exit:{exit_layer}+block")
    agreement_bare = agreement(bare, heldout, config.train)
    agreement_init = agreement(drafter, heldout, config.train)
    result = finetune(drafter, train_records, config.train)
    agreement_trained = agreement(drafter, heldout, config.train)
    draft_ms, large_ms = measure_draft_cost(large, model)
    logger.info("k=%d: agreement bare %.3f, init %.3f, trained %.3f; draft/large %.2f/%.2f ms", exit_layer,
                agreement_bare, agreement_init, agreement_trained, draft_ms, large_ms)
    report = LayerReport(exit_layer, init_layer, agreement_bare, agreement_init, agreement_trained, result.steps,
                         result.first_loss, result.final_loss, result.seconds, draft_ms, large_ms, draft_ms / large_ms)
    return report, model


def train_exits(calibration: Path = DEFAULT_CALIBRATION, out_dir: Path = WEIGHTS_DIR,
                config: ExitTrainConfig = ExitTrainConfig(), report_path: Path | None = None) -> ExitTrainReport:
    """Train and measure every candidate k; save the ``ship_layer`` block to ``out_dir`` with the whole report."""
    records = [record for record in read_calibration(calibration) if record.output_ids]
    if not records:
        raise ValueError(f"no calibration records in {calibration}; run `bild little` (or `bild align`) first")
    train_records, heldout = split_by_index(records, config.heldout_every)
    train_records = train_records[: config.max_train_records]
    heldout = heldout[: config.max_heldout_records]
    large = load_model(DEFAULT_LARGE, device="cpu")  # the recipe trains on a CPU, in float32
    _frozen(large)
    layers, shipped = [], None
    for exit_layer in config.exit_layers:
        report, model = train_layer(large, exit_layer, train_records, heldout, config)
        layers.append(report)
        if exit_layer == config.ship_layer:
            shipped, shipped_init = model, report.init_layer
        if report_path is not None:  # partial results survive an interrupted sweep
            report_path.write_text(json.dumps([asdict(r) for r in layers], indent=2) + "\n")
    result = ExitTrainReport(
        calibration_file=str(calibration),
        train_records=len(train_records),
        heldout_records=len(heldout),
        heldout_target_tokens=sum(min(len(r.output_ids), config.train.max_target_tokens) for r in heldout),
        layers=layers,
        shipped_layer=config.ship_layer if shipped is not None else None,
        resumed_from=json.loads(config.resume_from.with_suffix(".json").read_text())["report"]
        if config.resume_from is not None else None,
    )
    if shipped is not None:
        save_exit(shipped, ExitSpec(shipped.exit_layer, shipped_init), asdict(result), out_dir)
    if report_path is not None:
        report_path.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result
