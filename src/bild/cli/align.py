"""`bild align` (prediction alignment for any pair) and `bild little` (build the default little models)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path

from bild.cli.common import add_device_arguments, check_output, fail, placement_from_args, set_threads
from bild.models import DEFAULT_LARGE

ALIGN_EPILOG = """\
examples:
  bild align --large smollm2-135m-instruct --small ./my-small --inputs prompts.jsonl --out ./my-small-aligned
  bild align --large ./t5-large --small ./t5-small --inputs sources.txt --out ./t5-small-aligned \\
      --max-new-tokens 64 --epochs 2 --kl-weight 1.0

inputs: JSONL with a 'prompt' (or 'source') field per line, or plain text with one prompt per line.
The large model's greedy outputs go to WORK_DIR/calibration.jsonl batch by batch: run the same command again to
resume an interrupted run. OUT gets the aligned small model (transformers format) and align-report.json.
"""

LENGTH_BUCKET_HELP = ("batch records of similar length: sort runs of this many shuffled records by length "
                      "(less padding, faster steps); 0 = plain shuffled batches")

LITTLE_EPILOG = """\
examples:
  bild little --out src/bild/weights                 # both variants (`make little` runs them side by side: ~1.5 h on 2 cores)
  bild little --out /tmp/little --prompts 200 --epochs 0.5 --variants aligned   # a quick smoke run

Builds prompts from training-split stdlib docstrings, generates the large model's greedy outputs (resumable, in
WORK_DIR), trains the aligned and the unaligned little model and writes OUT/little-report.json.
"""


def register(subparsers) -> None:
    align = subparsers.add_parser(
        "align", help="prediction alignment: fine-tune a small model on a large model's greedy outputs",
        description=__doc__, epilog=ALIGN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    align.add_argument("--large", default=DEFAULT_LARGE, help="large model: name, directory or hub id (default: %(default)s)")
    align.add_argument("--small", required=True, help="small model to align: name, directory or hub id")
    align.add_argument("--inputs", type=Path, required=True, help="JSONL ('prompt'/'source') or text, one per line")
    align.add_argument("--out", type=Path, required=True, help="directory for the aligned model and its report")
    align.add_argument("--work-dir", type=Path, help="calibration data directory (default: OUT/calibration)")
    add_device_arguments(align)
    _training_arguments(align)
    align.add_argument("--heldout-fraction", type=float, default=0.1, help="records kept for agreement (default: %(default)s)")
    align.set_defaults(func=run_align)

    little = subparsers.add_parser(
        "little", help="build the default little models (aligned and unaligned) for SmolLM2-135M-Instruct",
        description=__doc__, epilog=LITTLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    little.add_argument("--out", type=Path, default=Path("src/bild/weights"), help="weights directory (default: %(default)s)")
    little.add_argument("--work-dir", type=Path, default=Path("build/little"), help="calibration data (default: %(default)s)")
    little.add_argument("--prompts", type=int, help="number of prompts (default: LittleConfig.prompts)")
    little.add_argument("--package-prompts", type=int,
                        help="more prompts about the docstrings of torch, one per docstring (default: LittleConfig's)")
    little.add_argument("--broad-prompts", type=int,
                        help="more prompts of ten kinds from the broad corpus of Debian packages' text "
                             "(bild.train.tasks; needs make little-packages) (default: LittleConfig's)")
    little.add_argument("--variants", default="aligned,unaligned", help="comma-separated (default: %(default)s)")
    little.add_argument("--calibration-only", action="store_true",
                        help="only generate the calibration data (then train variants in separate processes)")
    little.add_argument("--epochs", type=float, help="training epochs (default: LittleConfig's)")
    little.add_argument("--kl-weight", type=float, help="token-level distillation weight (default: LittleConfig's)")
    little.add_argument("--learning-rate", type=float, help="AdamW peak (default: LittleConfig's)")
    little.add_argument("--init-layers", help="comma-separated large-model layers to start from (default: LittleConfig's)")
    little.add_argument("--delta-rank", type=int,
                        help="train low-rank deltas of this rank on frozen copies of the layers; 0 trains the layers "
                             "themselves (default: LittleConfig's)")
    little.add_argument("--length-bucket", type=int, help=f"{LENGTH_BUCKET_HELP} (default: LittleConfig's)")
    little.add_argument("--max-train-minutes", type=float, help="safety stop per variant on a busy machine")
    little.add_argument("--threads", type=int, help="torch CPU threads (1 avoids oversubscription on a busy machine)")
    little.set_defaults(func=run_little)


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration and training")
    group.add_argument("--max-new-tokens", type=int, default=96, help="calibration output length cap (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=8, help="generation and training batch (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=16, help="large-model log-probs kept per position (default: %(default)s)")
    group.add_argument("--epochs", type=float, default=2.0, help="(default: %(default)s)")
    group.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW peak (default: %(default)s)")
    group.add_argument("--kl-weight", type=float, default=0.0, help="token-level distillation on the top-k (default: %(default)s)")
    group.add_argument("--train-embeddings", action="store_true", help="also train the input embeddings (frozen by default)")
    group.add_argument("--length-bucket", type=int, default=0, help=f"{LENGTH_BUCKET_HELP} (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=int, help="torch CPU threads (1 avoids oversubscription on a busy machine)")


def run_align(args: argparse.Namespace) -> int:
    from bild.train.align import AlignInputError, CalibrationConfig, TrainConfig, align, read_inputs
    from bild.models import ModelLoadError, load_model, small_placement

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    where, small_device = placement_from_args(args)
    try:
        check_output(args.out, "--out", directory=True)
        check_output(args.work_dir, "--work-dir", directory=True)
        set_threads(args.threads)
        _check_training_arguments(args)
        if not 0 < args.heldout_fraction < 1:
            raise ValueError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
        prompts = read_inputs(args.inputs)
        calibration = CalibrationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, top_k=args.top_k)
        train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                            kl_weight=args.kl_weight, freeze_embeddings=not args.train_embeddings,
                            max_target_tokens=args.max_new_tokens, seed=args.seed,
                            length_bucket=_non_negative("--length-bucket", args.length_bucket))
        large = load_model(args.large, where=where)
        small = load_model(args.small, large=large, where=small_placement(large, where, small_device))
        report = align(large, small, prompts, args.work_dir or args.out / "calibration", args.out, calibration,
                       train, args.heldout_fraction)
    except (AlignInputError, ModelLoadError, ValueError) as error:
        return fail("align", str(error))
    print(json.dumps(asdict(report), indent=2))
    return 0


def _check_training_arguments(args: argparse.Namespace) -> None:
    """The numbers of `bild align`, before any model loads."""
    _at_least_one("--max-new-tokens", args.max_new_tokens)
    _at_least_one("--batch-size", args.batch_size)
    _non_negative("--top-k", args.top_k)
    _positive("--epochs", args.epochs)
    _positive("--learning-rate", args.learning_rate)
    _non_negative("--kl-weight", args.kl_weight)


def _non_negative(flag: str, value: float) -> float:
    if not value >= 0:  # also refuses nan
        raise ValueError(f"{flag} must be >= 0, got {value}")
    return value


def _positive(flag: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{flag} must be > 0, got {value}")
    return value


def _at_least_one(flag: str, value: int) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")
    return value


def _layer_list(text: str) -> tuple[int, ...]:
    """'0,6,12' -> (0, 6, 12); the default large model has layers 0..29."""
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--init-layers takes comma-separated layer numbers, got {text!r}") from None
    if not layers or not all(0 <= layer < 30 for layer in layers):
        raise ValueError(f"--init-layers takes layer numbers from 0 to 29, got {text!r}")
    return layers


def run_little(args: argparse.Namespace) -> int:
    from bild.train.corpus import CorpusSourceMissing
    from bild.train.little import LittleConfig, build_default_little

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_output(args.out, "--out", directory=True)
        check_output(args.work_dir, "--work-dir", directory=True)
        set_threads(args.threads)
        config = LittleConfig()
        if args.prompts is not None:
            config = replace(config, prompts=_at_least_one("--prompts", args.prompts))
        if args.package_prompts is not None:
            config = replace(config, package_prompts=_non_negative("--package-prompts", args.package_prompts))
        if args.broad_prompts is not None:
            config = replace(config, broad_prompts=_non_negative("--broad-prompts", args.broad_prompts))
        if args.epochs is not None:
            config = replace(config, train=replace(config.train, epochs=_positive("--epochs", args.epochs)))
        if args.kl_weight is not None:
            config = replace(config, train=replace(config.train, kl_weight=_non_negative("--kl-weight", args.kl_weight)))
        if args.learning_rate is not None:
            learning_rate = _positive("--learning-rate", args.learning_rate)
            config = replace(config, train=replace(config.train, learning_rate=learning_rate))
        if args.init_layers is not None:
            config = replace(config, init_layers=_layer_list(args.init_layers))
        if args.delta_rank is not None:
            config = replace(config, delta_rank=_non_negative("--delta-rank", args.delta_rank))
        if args.max_train_minutes is not None:
            minutes = _positive("--max-train-minutes", args.max_train_minutes)
            config = replace(config, train=replace(config.train, max_minutes=minutes))
        if args.length_bucket is not None:
            bucket = _non_negative("--length-bucket", args.length_bucket)
            config = replace(config, train=replace(config.train, length_bucket=bucket))
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        if not variants or set(variants) - {"aligned", "unaligned"}:
            raise ValueError(f"--variants must be 'aligned', 'unaligned' or both, got {args.variants!r}")
        if args.calibration_only:
            variants = ()
        report = build_default_little(args.out, args.work_dir, config, variants)
    except (ValueError, CorpusSourceMissing) as error:  # CorpusSourceMissing names the apt-get command
        return fail("little", str(error))
    print(json.dumps(asdict(report), indent=2))
    for variant in report.variants:
        print(f"{variant.variant}: agreement {variant.agreement_before:.3f} -> {variant.agreement_after:.3f}, "
              f"{variant.steps} steps, {variant.train_seconds:.0f} s, {variant.weights_mb:.1f} MB")
    print(f"decode cost: little {report.small_decode_ms:.1f} ms / large {report.large_decode_ms:.1f} ms "
          f"= {report.decode_cost_ratio:.1%}")
    return 0
