"""`bild eval` and `bild sweep`: quality and speed of a model pair against the alternatives, on any dataset."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from bild.cli.common import (
    LOOKUP_HELP, UsageError, add_config_argument, add_device_arguments, check_output, comma_numbers, fail, placement_from_args,
    set_threads, speedup_bar,
)
from bild.config import BiLDConfig
from bild.models import DEFAULT_LARGE, DEFAULT_SMALL

DEFAULT_METHODS = "vanilla,bild,bild-lossless,hf-assisted,speculative,small"

EVAL_EPILOG = """\
examples:
  bild eval --dataset docsum --limit 40                       # the default pair on the built-in set
  bild eval --dataset docsum --limit 40 --methods vanilla,bild,bild-lossless,hf-assisted,speculative,small,\\
bild-no-rollback,bild-no-fallback --json-out eval.json --out-dir eval-run
  bild eval --dataset my.jsonl --prompt-template 'Summarize in one sentence:\\n{source}' --rollback-threshold 3
  bild eval --dataset xsum --limit 100                        # needs: pip install 'bild[datasets]' and the Hub

data: a .jsonl/.csv/.tsv file with 'source' and 'reference' (optional 'id'), or a name: %(datasets)s.
methods:
%(methods)s
speedup = vanilla total time / method total time; exact_match = share of outputs equal to vanilla's;
fallback_rate and rollback_rate are per generated token. Ctrl-C stops and keeps the finished examples.
"""

SWEEP_EPILOG = """\
examples:
  bild sweep --dataset docsum --limit 20                      # the paper's summarization grid, default pair
  bild sweep --dataset docsum --limit 20 --small-unaligned smollm2-little-unaligned \\
      --fallback-thresholds 0.3,0.5 --rollback-thresholds 2,4 --json-out sweep.json --plot sweep.png

Prints the Table 1 picks: the fastest point with no quality loss and the fastest within one point of vanilla.
"""


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="docsum", help="a name or a .jsonl/.csv/.tsv file (default: %(default)s)")
    data.add_argument("--prompt-template", help="with {source}; default: the dataset's (e.g. 'Summarize in one sentence:\\n{source}')")
    data.add_argument("--limit", type=int, help="use the first LIMIT examples")
    data.add_argument("--per-kind", type=int, metavar="K",
                      help="use the first K examples of each kind (tagged sets such as mixed), before --limit")
    data.add_argument("--no-chat", action="store_true", help="do not apply the large model's chat template")
    models = parser.add_argument_group("models")
    models.add_argument("--large", default=DEFAULT_LARGE, help="large model: registered name, directory or hub id (default: %(default)s)")
    models.add_argument("--small", default=DEFAULT_SMALL, help="small model (default: %(default)s)")
    add_device_arguments(parser)
    bild = parser.add_argument_group("decoding (greedy, as in the paper)")
    bild.add_argument("--max-small-steps", type=int, default=10, help="N (default: %(default)s)")
    bild.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    bild.add_argument("--repeat-ngram", type=int, default=BiLDConfig().repeat_ngram, metavar="N",
                      help="repetition guard of the BiLD methods (not in the paper); 0 = off (default: %(default)s)")
    bild.add_argument("--policy", choices=["adaptive", "fixed"], default=BiLDConfig().policy,
                      help="drafting policy of the bild methods; bild-fixed and bild-lossless-fixed always use fixed "
                           "(default: %(default)s)")
    bild.add_argument("--lookup", type=int, default=None, metavar="N",
                      help=LOOKUP_HELP)
    add_config_argument(bild)
    output = parser.add_argument_group("output")
    output.add_argument("--json-out", type=Path, help="write the summary JSON here")
    output.add_argument("--out-dir", type=Path, help="write per-example rows to OUT_DIR/examples.jsonl as they finish")
    output.add_argument("--warmup", type=int, default=1, help="untimed warm-up examples per method (default: %(default)s)")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    output.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 avoids oversubscription on a busy machine)")


def register(subparsers) -> None:
    from bild.eval.datasets import dataset_names
    from bild.eval.methods import describe_methods

    evaluate = subparsers.add_parser(
        "eval",
        help="compare vanilla, BiLD and the alternatives side by side on a dataset",
        description=__doc__,
        epilog=EVAL_EPILOG % {"datasets": ", ".join(dataset_names()), "methods": describe_methods()},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_arguments(evaluate)
    evaluate.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated (default: %(default)s); vanilla always runs")
    evaluate.add_argument("--fallback-threshold", type=float, default=0.6, help="alpha_FB (default: %(default)s)")
    evaluate.add_argument("--rollback-threshold", type=float, default=5.0, help="alpha_RB; 0 = lossless (default: %(default)s)")
    evaluate.add_argument("--draft-window", type=int, default=5, help="draft tokens per large pass of 'speculative' (default: %(default)s)")
    evaluate.set_defaults(func=run_eval)

    sweep = subparsers.add_parser(
        "sweep",
        help="grid over the fallback and rollback thresholds: JSON, a Figure-4 plot and the Table 1 picks",
        description=__doc__,
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_arguments(sweep)
    sweep.add_argument("--small-unaligned", help="a second small model, plotted as the 'unaligned' series")
    sweep.add_argument("--fallback-thresholds", help="comma-separated alpha_FB values (default: the paper's range for the task)")
    sweep.add_argument("--rollback-thresholds", help="comma-separated alpha_RB values (default: the paper's range for the task)")
    sweep.add_argument("--plot", type=Path, help="PNG path (default: next to --json-out, or sweep.png in --out-dir)")
    sweep.set_defaults(func=run_sweep)


def _load_inputs(args: argparse.Namespace, config_overrides: dict):
    from bild.eval.datasets import load_dataset

    set_threads(args.threads)
    config = BiLDConfig(max_small_steps=args.max_small_steps, max_new_tokens=args.max_new_tokens,
                        repeat_ngram=args.repeat_ngram, policy=args.policy, lookup=args.lookup, **config_overrides)
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    template = args.prompt_template.replace("\\n", "\n") if args.prompt_template else None  # a typed \n is a newline
    dataset = load_dataset(args.dataset, prompt_template=template, limit=args.limit, per_kind=args.per_kind)
    return config, dataset


def run_eval(args: argparse.Namespace) -> int:
    from bild.eval.harness import evaluate, write_json
    from bild.eval.methods import method_names, needs_small
    from bild.models import load_pair

    where, small_device = placement_from_args(args)
    try:
        check_output(args.json_out, "--json-out")
        check_output(args.out_dir, "--out-dir", directory=True)
        methods = [name.strip() for name in args.methods.split(",") if name.strip()]
        unknown = [name for name in methods if name not in method_names()]
        if unknown or not methods:
            raise ValueError(f"unknown method {', '.join(unknown) or '(none)'}; choose from {', '.join(method_names())}")
        if args.draft_window < 1:
            raise ValueError(f"--draft-window must be >= 1, got {args.draft_window}")
        config, dataset = _load_inputs(
            args, {"fallback_threshold": args.fallback_threshold, "rollback_threshold": args.rollback_threshold}
        )
        small = None if args.small.lower() == "none" else args.small
        if small is None and any(needs_small(name) for name in methods):
            raise ValueError("these methods need a small model: " + ", ".join(name for name in methods if needs_small(name)))
        print(f"loading {args.large} + {small} ...", file=sys.stderr)
        pair = load_pair(args.large, small, where=where, small_device=small_device)
        callback, bar = speedup_bar(not args.no_progress, len(dataset.examples), f"eval {dataset.name}")
        result = evaluate(
            pair, dataset, methods, config, out_dir=args.out_dir, warmup=args.warmup,
            chat=False if args.no_chat else None, draft_window=args.draft_window, on_progress=callback,
        )
    except ValueError as error:  # DatasetError, ModelLoadError, VocabularyMismatchError, bad settings
        return fail("eval", str(error))
    if bar is not None:
        bar.close()
    summary = result.to_json()
    print(format_table(summary))
    if result.interrupted:
        print(f"interrupted: the summary covers the {result.n} finished examples", file=sys.stderr)
    with _kept_if_unwritable(summary):
        if args.json_out:
            write_json(summary, args.json_out)
            print(f"summary: {args.json_out}", file=sys.stderr)
        if args.out_dir:
            write_json(summary, args.out_dir / "summary.json")
            print(f"per-example rows: {args.out_dir / 'examples.jsonl'}", file=sys.stderr)
    return 130 if result.interrupted else 0


@contextmanager
def _kept_if_unwritable(summary: dict):
    """A write failing after the run (its path was checked before; the disk filled up or it changed since): print
    the summary JSON instead of losing it, and say what failed in one line (UsageError: exit code 2)."""
    try:
        yield
    except OSError as error:
        print(json.dumps(summary, allow_nan=False))
        raise UsageError(f"could not write {error.filename}: {error.strerror}; the summary JSON is printed above") from None


def format_table(summary: dict) -> str:
    """The summary as an aligned text table, one row per method."""
    lines = [f"{summary['dataset']}: n={summary['n']}, large={summary['large']}, small={summary['small']}"]
    lines += _method_rows(summary["methods"])
    for kind, methods in summary.get("kinds", {}).items():
        lines += ["", f"kind {kind}:"] + _method_rows(methods)
    return "\n".join(lines)


_COLUMNS = [
    ("method", None), ("ROUGE-L", "rougeL"), ("BLEU", "bleu"), ("vs large", "rougeL_vs_large"), ("rep-4", "rep4"),
    ("time s", "time_s"), ("speedup", "speedup"), ("tok/s ratio", "throughput_ratio"), ("exact", "exact_match"),
    ("fallback", "fallback_rate"), ("rollback", "rollback_rate"), ("tok/large pass", "tokens_per_large_pass"),
]


def _method_rows(methods: dict) -> list[str]:
    """One aligned row per method (speedup = latency ratio over vanilla; tok/s ratio = throughput ratio)."""
    rows = [[title for title, _ in _COLUMNS]]
    for name, values in methods.items():
        rows.append([name] + [_cell(key, values.get(key)) for _, key in _COLUMNS[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("speedup", "throughput_ratio"):
        return f"{value:.2f}x"
    if key in ("exact_match", "fallback_rate", "rollback_rate"):
        return f"{value:.2f}"
    return f"{value:.1f}" if key != "tokens_per_large_pass" else f"{value:.2f}"


def run_sweep(args: argparse.Namespace) -> int:
    from bild.eval.harness import write_json
    from bild.eval.sweep import default_grid, plot, run_sweep as sweep
    from bild.models import check_same_vocabulary, load_model, small_placement

    plot_path = args.plot or (args.json_out.with_suffix(".png") if args.json_out else None)
    plot_path = plot_path or (args.out_dir / "sweep.png" if args.out_dir else None)
    where, small_device = placement_from_args(args)
    try:
        check_output(args.json_out, "--json-out")
        check_output(args.out_dir, "--out-dir", directory=True)
        check_output(plot_path, "--plot")
        config, dataset = _load_inputs(args, {})
        fallback_grid, rollback_grid = default_grid(dataset.metric)
        if args.fallback_thresholds is not None:  # "" is a mistake, not "the default grid"
            fallback_grid = comma_numbers(args.fallback_thresholds, "--fallback-thresholds")
        if args.rollback_thresholds is not None:
            rollback_grid = comma_numbers(args.rollback_thresholds, "--rollback-thresholds")
        for fallback in fallback_grid:  # the config validates every value before any model loads
            BiLDConfig(fallback_threshold=fallback)
        for rollback in rollback_grid:
            BiLDConfig(rollback_threshold=rollback)
        names = {"aligned": args.small} | ({"unaligned": args.small_unaligned} if args.small_unaligned else {})
        print(f"loading {args.large} + {', '.join(names.values())} ...", file=sys.stderr)
        large = load_model(args.large, where=where)
        smalls = {}
        for series, name in names.items():
            smalls[series] = load_model(name, large=large, where=small_placement(large, where, small_device))
            check_same_vocabulary(large, smalls[series])
        points = len(fallback_grid) * len(rollback_grid) * len(smalls)
        callback, bar = speedup_bar(not args.no_progress, len(dataset.examples), f"sweep {points} points")
        result, _ = sweep(
            large, smalls, dataset, fallback_grid, rollback_grid, config, out_dir=args.out_dir, warmup=args.warmup,
            chat=False if args.no_chat else None, on_progress=callback,
        )
    except ValueError as error:
        return fail("sweep", str(error))
    if bar is not None:
        bar.close()
    summary = result.to_json()
    print(format_picks(result))
    with _kept_if_unwritable(summary):
        if args.json_out:
            write_json(summary, args.json_out)
            print(f"sweep points: {args.json_out}", file=sys.stderr)
        if args.out_dir:
            write_json(summary, args.out_dir / "sweep.json")
        if plot_path:
            plot(result, plot_path)
            print(f"plot: {plot_path}", file=sys.stderr)
    return 130 if result.interrupted else 0


def format_picks(result) -> str:
    metric = {"rougeL": "ROUGE-L", "bleu": "BLEU"}.get(result.metric, result.metric)
    vanilla = f"{result.vanilla_quality:.2f}" if result.vanilla_quality is not None else "-"
    lines = [f"{result.dataset}: n={result.n}, {metric}, vanilla {vanilla} in {result.vanilla.time_s:.1f} s"]
    lines.append(f"{'series':<10} {'pick':<14} {'fb':>5} {'rb':>5} {metric:>8} {'speedup':>8}")
    for series in result.series_names():
        for key, label in (("no_loss", "no loss"), ("within_1", "within 1 pt")):
            point = result.picks(series)[key]
            if point is None:
                lines.append(f"{series:<10} {label:<14} {'-':>5} {'-':>5} {'-':>8} {'-':>8}   (no grid point qualifies)")
            else:
                lines.append(
                    f"{series:<10} {label:<14} {point.fallback_threshold:>5g} {point.rollback_threshold:>5g} "
                    f"{point.quality:>8.2f} {point.speedup:>7.2f}x"
                )
    return "\n".join(lines)

