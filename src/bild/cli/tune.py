"""`bild tune`: the best alpha_FB, alpha_RB, N and policy for your pair on your prompts, as a settings file."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from bild.cli.common import (
    UsageError, add_device_arguments, add_model_arguments, check_output, comma_numbers, fail, placement_from_args,
    set_threads, speedup_bar,
)
from bild.config import BiLDConfig

TUNE_EPILOG = """\
examples:
  bild tune --input prompts.jsonl --output bild.json                  # lossless: identical to the large model
  bild tune --input prompts.jsonl --output bild.json --max-loss 20    # ROUGE-L >= 80 against the large model
  bild tune --dataset docsum --limit 10 --output bild.json --policies adaptive --rollback-thresholds 0
  bild generate --config bild.json "Explain photosynthesis."          # then use it (so do eval, serve, sweep)

--input takes the file format of `bild generate --input` (one JSON object a line with "prompt" or "messages"; no
per-line settings). Each prompt runs the large model alone and every grid point side by side; the fastest point
that keeps the bound is written, or the large model alone if no such point is faster. Rows go to the work directory
as each prompt finishes: Ctrl-C keeps them, and the same command continues where it stopped. A different --max-loss
reuses them (the bound only changes the pick).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("tune", help="pick the thresholds, N and the policy for your pair on your prompts",
                                   description=__doc__, epilog=TUNE_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("prompts (one of)")
    data.add_argument("--input", type=Path, help="a JSONL file of prompts, as for `bild generate --input`")
    data.add_argument("--dataset", help="a `bild eval` dataset instead: a built-in name or a .jsonl/.csv/.tsv file")
    data.add_argument("--prompt-template", help="with --dataset: with {source} (default: the dataset's)")
    data.add_argument("--limit", type=int, default=20, help="the first LIMIT prompts (default: %(default)s)")
    data.add_argument("--no-chat", action="store_true", help="do not apply the large model's chat template")
    add_model_arguments(parser)
    add_device_arguments(parser)
    defaults, grid = BiLDConfig(), _default_grid()
    search = parser.add_argument_group("what to try (every combination runs)")
    search.add_argument("--policies", default=",".join(grid.policies), help="(default: %(default)s)")
    search.add_argument("--max-small-steps", default=_joined(grid.max_small_steps), help="N values (default: %(default)s)")
    search.add_argument("--fallback-thresholds", default=_joined(grid.fallback_thresholds),
                        help="alpha_FB values (default: %(default)s)")
    search.add_argument("--rollback-thresholds", default=_joined(grid.rollback_thresholds),
                        help="alpha_RB values; 0 = lossless (default: %(default)s)")
    search.add_argument("--max-loss", type=float, default=0.0,
                        help="quality bound: ROUGE-L against the large model's own outputs may drop at most this "
                             "many points below 100; 0 = identical outputs only (default: %(default)s)")
    search.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    search.add_argument("--repeat-ngram", type=int, default=defaults.repeat_ngram, metavar="N",
                        help="repetition guard, as for generate (default: %(default)s)")
    output = parser.add_argument_group("output")
    output.add_argument("--output", type=Path, required=True, help="the settings file to write (JSON)")
    output.add_argument("--work-dir", type=Path, help="rows of the run, for resuming (default: OUTPUT's name + .tune)")
    output.add_argument("--warmup", type=int, default=1, help="untimed warm-up prompts (default: %(default)s)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.set_defaults(func=run)


def _default_grid():
    from bild.eval.tune import TuneGrid

    return TuneGrid()


def _joined(values) -> str:
    return ",".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)


def run(args: argparse.Namespace) -> int:
    from bild.eval.harness import write_json
    from bild.eval.tune import TuneGrid, check_max_loss, check_work_dir, prompts_digest, tune
    from bild.models import load_pair

    where, small_device = placement_from_args(args)
    work_dir = args.work_dir or args.output.with_name(args.output.stem + ".tune")
    try:
        check_output(args.output, "--output")
        check_output(work_dir, "--work-dir", directory=True)
        if (args.input is None) == (args.dataset is None):
            raise UsageError("give the prompts as --input FILE or --dataset NAME (one of them)")
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        check_max_loss(args.max_loss)
        policies = tuple(part.strip() for part in args.policies.split(",") if part.strip())
        grid = TuneGrid(policies=policies,
                        max_small_steps=comma_numbers(args.max_small_steps, "--max-small-steps", int),
                        fallback_thresholds=comma_numbers(args.fallback_thresholds, "--fallback-thresholds"),
                        rollback_thresholds=comma_numbers(args.rollback_thresholds, "--rollback-thresholds"))
        base = BiLDConfig(max_new_tokens=args.max_new_tokens, repeat_ngram=args.repeat_ngram)
        examples, prompts = _prompts(args)
        small = None if args.small.lower() == "none" else args.small
        if small is None:
            raise ValueError("tune needs a small model: --small none leaves nothing to tune")
        set_threads(args.threads)
        run_key = {"large": args.large, "small": small, "prompts": prompts_digest(prompts), "grid": asdict(grid),
                   "max_new_tokens": base.max_new_tokens, "repeat_ngram": base.repeat_ngram, "chat": not args.no_chat,
                   "device": args.device, "dtype": args.dtype}
        resuming = check_work_dir(work_dir, run_key)
        print(f"loading {args.large} + {small} ..." + (f" (resuming the run in {work_dir})" if resuming else ""),
              file=sys.stderr)
        pair = load_pair(args.large, small, where=where, small_device=small_device)
        points = len(grid.points())
        callback, bar = speedup_bar(not args.no_progress, len(examples), f"tune {points} points")
        result = tune(pair, examples, prompts, grid, base, args.max_loss, work_dir, run_key,
                      chat=False if args.no_chat else None, warmup=args.warmup, on_progress=callback)
    except ValueError as error:  # TuneError, PromptFileError, DatasetError, ModelLoadError, bad settings
        return fail("tune", str(error))
    if bar is not None:
        bar.close()
    print(format_points(result))
    if result.interrupted or result.n < result.total:
        print(f"interrupted: {result.n} of {result.total} prompts done, kept in {work_dir}; run the same command "
              "again to continue", file=sys.stderr)
        return 130
    settings = result.settings(args.large, small, base)
    write_json(settings, args.output)
    print(f"pick: {settings['tuned']['pick']}\nsettings: {args.output} (use it: bild generate --config "
          f"{args.output} ...)", file=sys.stderr)
    return 0


def _prompts(args: argparse.Namespace) -> tuple[list, list]:
    """(examples, prompts): one Example per prompt (unique ids, no reference) and the prompt itself (a string or
    chat messages); bad files are refused before any model loads."""
    from bild.batch import read_prompts
    from bild.eval.datasets import Example, load_dataset

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.input is not None:
        records = read_prompts(args.input)[: args.limit]
        for record in records:
            if record.settings or record.chat is not None:
                name = record.settings[0][0] if record.settings else "chat"
                raise ValueError(f"{args.input} line {record.line}: tune chooses the settings itself; remove "
                                 f"{name!r} from the line")
        prompts = [record.prompt for record in records]
        examples = [Example(id=str(record.id), source=json.dumps(record.prompt, ensure_ascii=False), reference="")
                    for record in records]
        name = str(args.input)
    else:
        template = args.prompt_template.replace("\\n", "\n") if args.prompt_template else None
        dataset = load_dataset(args.dataset, prompt_template=template, limit=args.limit)
        examples, prompts = list(dataset.examples), [dataset.prompt(example) for example in dataset.examples]
        name = f"dataset {args.dataset!r}"
    ids = [example.id for example in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name} repeats an id (5 and \"5\" count as one here); tune keys its rows on ids")
    return examples, prompts


def format_points(result) -> str:
    """Every point, fastest first, with whether it keeps the bound; the pick marked."""
    pick = result.pick
    bound = "identical" if result.max_loss == 0 else f"vs large >= {100 - result.max_loss:g}"
    lines = [f"{result.n} prompts; bound: {bound}; large model alone = 1.00x", "",
             f"{'point':<34} {'speedup':>8} {'tok/s ratio':>11} {'vs large':>8} {'exact':>6} {'tok/pass':>8}  bound"]
    for row in sorted(result.points, key=lambda row: -row.summary.speedup):
        summary = row.summary
        vs_large = f"{summary.rougeL_vs_large:.1f}" if summary.rougeL_vs_large is not None else "-"
        per_pass = f"{summary.tokens_per_large_pass:.2f}" if summary.tokens_per_large_pass else "-"
        mark = "kept" if row.keeps_bound else "-"
        mark += "  <- pick" if pick is not None and row.point == pick.point else ""
        lines.append(f"{row.point.label:<34} {summary.speedup:>7.2f}x {summary.throughput_ratio:>10.2f}x "
                     f"{vs_large:>8} {summary.exact_match:>6.2f} {per_pass:>8}  {mark}")
    if pick is None:
        lines.append("\nno point that keeps the bound beat the large model alone: the settings run it alone")
    return "\n".join(lines)
