"""`bild early-exit`: train the default large model's exit block (agreement and cost per k), and measure cost."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from bild.cli.common import UsageError, check_output, set_threads

EPILOG = """examples:
  bild early-exit train                                   # k = 2,4,6,8 measured, k = 4 shipped to src/bild/weights
  bild early-exit train --exit-layers 4 --ship-layer 4 --epochs 1.5 --report build/early-exit/report.json
  bild early-exit cost --small early-exit:2,early-exit:4,smollm2-little   # ms per step, side by side
  bild generate --small smollm2-early-exit "Explain photosynthesis."
  bild eval --dataset docsum --limit 20 --methods vanilla,bild,bild-early-exit

Calibration data is the little models' (`bild little` writes build/little/calibration.jsonl); the large model's
weights stay frozen: only the exit block (one decoder layer, fp16) is trained and stored.
"""


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 2,4,6; got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("early-exit", help="early-exit drafter: train its exit block, measure its cost",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="early_exit_command", required=True)
    train = commands.add_parser("train", help="distil the exit block on the large model's greedy outputs")
    train.add_argument("--calibration", type=Path, default=Path("build/little/calibration.jsonl"),
                       help="calibration JSONL of the default large model (default: %(default)s)")
    train.add_argument("--exit-layers", type=_layers, default=(2, 4, 6, 8), help="candidate k (default: 2,4,6,8)")
    train.add_argument("--ship-layer", type=int, default=4, help="the k whose block is saved (default: %(default)s)")
    train.add_argument("--init-from", choices=["last", "next"], default="last",
                       help="exit block starts as the large model's last layer or layer k (default: %(default)s)")
    train.add_argument("--epochs", type=float, default=1.0, help="(default: %(default)s)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="(default: %(default)s)")
    train.add_argument("--kl-weight", type=float, default=0.0,
                       help="weight of the soft cross-entropy on the large model's stored top-k (default: %(default)s)")
    train.add_argument("--resume-from", type=Path, help="continue training a saved block (.safetensors with its .json)")
    train.add_argument("--max-train-records", type=int, help="use the first N training records")
    train.add_argument("--out-dir", type=Path, default=None, help="where the block goes (default: src/bild/weights)")
    train.add_argument("--report", type=Path, help="also write the JSON report here")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.set_defaults(func=_cmd_train)
    cost = commands.add_parser("cost", help="per-token draft step vs full large step, measured side by side")
    cost.add_argument("--small", default="smollm2-early-exit,smollm2-little",
                      help="comma-separated drafters, early exits or not (default: %(default)s)")
    cost.add_argument("--steps", type=int, default=32, help="decode steps per round (default: %(default)s)")
    cost.add_argument("--rounds", type=int, default=5, help="interleaved rounds, min taken (default: %(default)s)")
    cost.add_argument("--threads", type=int, help="torch CPU threads")
    cost.set_defaults(func=_cmd_cost)
    agree = commands.add_parser("agreement", help="held-out top-1 agreement of drafters with the large model, same records")
    agree.add_argument("--small", default="smollm2-early-exit,smollm2-little",
                       help="comma-separated drafters (default: %(default)s)")
    agree.add_argument("--calibration", type=Path, default=Path("build/little/calibration.jsonl"),
                       help="calibration JSONL; held out: prompt index %% 10 == 0 (default: %(default)s)")
    agree.add_argument("--max-records", type=int, default=100, help="first N held-out records (default: %(default)s)")
    agree.add_argument("--threads", type=int, help="torch CPU threads")
    agree.set_defaults(func=_cmd_agreement)


def _cmd_train(args: argparse.Namespace) -> None:
    from bild.drafters import WEIGHTS_DIR
    from bild.train.early_exit import ExitTrainConfig, train_exits

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_output(args.out_dir, "--out-dir", directory=True)
    check_output(args.report, "--report")
    _check_input_file(args.calibration, "--calibration")
    set_threads(args.threads)
    for flag, value in (("--epochs", args.epochs), ("--learning-rate", args.learning_rate)):
        if not value > 0:  # also refuses nan
            raise UsageError(f"{flag} must be > 0, got {value}")
    if not args.kl_weight >= 0:
        raise UsageError(f"--kl-weight must be >= 0, got {args.kl_weight}")
    if args.max_train_records is not None and args.max_train_records < 1:
        raise UsageError(f"--max-train-records must be >= 1, got {args.max_train_records}")
    if args.ship_layer not in args.exit_layers:
        raise UsageError(f"--ship-layer {args.ship_layer} is not among --exit-layers {args.exit_layers}")
    defaults = ExitTrainConfig()
    config = replace(defaults, exit_layers=args.exit_layers, ship_layer=args.ship_layer, init_from=args.init_from,
                     max_train_records=args.max_train_records, resume_from=args.resume_from,
                     train=replace(defaults.train, epochs=args.epochs, learning_rate=args.learning_rate,
                                   kl_weight=args.kl_weight))
    try:
        report = train_exits(args.calibration, args.out_dir or WEIGHTS_DIR, config, args.report)
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(f"{report.train_records} training / {report.heldout_records} held-out records "
          f"({report.heldout_target_tokens} held-out tokens)")
    print("k  init  agreement: bare  init   trained   draft ms  large ms  cost ratio")
    for layer in report.layers:
        print(f"{layer.exit_layer:<2} {layer.init_layer:<5} {layer.agreement_bare:15.3f} {layer.agreement_init:6.3f} "
              f"{layer.agreement_trained:8.3f} {layer.draft_ms:10.2f} {layer.large_ms:9.2f} {layer.cost_ratio:10.3f}")
    if report.shipped_layer is not None:
        print(f"shipped the k={report.shipped_layer} exit block to {args.out_dir or WEIGHTS_DIR}")


def _cmd_cost(args: argparse.Namespace) -> None:
    from bild.train.early_exit import measure_step_costs

    set_threads(args.threads)
    if args.steps < 1 or args.rounds < 1:
        raise UsageError(f"--steps and --rounds must be >= 1, got {args.steps} and {args.rounds}")
    large, drafters = _load_drafters(args.small)
    costs = measure_step_costs(large, drafters, steps=args.steps, rounds=args.rounds)
    print(json.dumps({"ms_per_step": costs,
                      "cost_ratio": {name: costs[name] / costs["large"] for name in drafters}}, indent=2))


def _cmd_agreement(args: argparse.Namespace) -> None:
    from bild.train.align import agreement, read_calibration
    from bild.train.early_exit import ExitTrainConfig
    from bild.train.little import split_by_index

    set_threads(args.threads)
    _check_input_file(args.calibration, "--calibration")
    if args.max_records < 1:
        raise UsageError(f"--max-records must be >= 1, got {args.max_records}")
    config = ExitTrainConfig()
    records = [record for record in read_calibration(args.calibration) if record.output_ids]
    heldout = split_by_index(records, config.heldout_every)[1][: args.max_records]
    if not heldout:
        raise UsageError(f"no held-out records in {args.calibration}")
    large, drafters = _load_drafters(args.small)
    tokens = sum(min(len(r.output_ids), config.train.max_target_tokens) for r in heldout)
    result = {name: agreement(drafter, heldout, config.train) for name, drafter in drafters.items()}
    print(json.dumps({"heldout_records": len(heldout), "heldout_tokens": tokens, "agreement": result}, indent=2))


def _check_input_file(path: Path, option: str) -> None:
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r} is a directory; give the calibration JSONL file")
    if not path.is_file():
        raise UsageError(f"{option} {str(path)!r} does not exist; `bild little --calibration-only` writes it")


def _load_drafters(names: str):
    """The default large model on the CPU (where the shipped exit was measured) and each comma-separated drafter."""
    from bild.models import DEFAULT_LARGE, load_model

    try:
        large = load_model(DEFAULT_LARGE, device="cpu")
        return large, {name: load_model(name, large=large) for name in names.split(",")}
    except ValueError as error:
        raise UsageError(str(error)) from error
