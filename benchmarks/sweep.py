"""Which thresholds should I use? Quality against speed over a grid of (alpha_FB, alpha_RB): the paper's Figure 4.

Every grid point (and, with --small-unaligned, the same grid with a second small model) runs interleaved per example
with one shared vanilla run (transformers' generate), after a warm-up, --repeats times. Each point's speedup and
latency are medians over the repeats (with min and max); the Table 1 picks (the fastest point with no quality loss,
and the fastest within one point of vanilla) are made on the medians. Writes the result JSON and, next to it, the
Figure-4 plot (same name, .png).

    python benchmarks/sweep.py --limit 10 --repeats 3 --threads 2 --fallback-thresholds 0.2,0.4,0.6 --rollback-thresholds 2,5,15
"""

from __future__ import annotations

import sys
from dataclasses import replace

from common import (
    BenchmarkError, add_docsum_arguments, base_parser, check_arguments, load_dataset, main_guard, provenance, relative,
    result_path, run_repeats, settings_of, spread, write_result,
)

QUESTION = "sweep"


def floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values:
        raise BenchmarkError(f"{option} takes comma-separated numbers, got {text!r}")
    return values


def median_result(runs: list):
    """The first repeat's sweep with every point's speedup and latency replaced by their medians over the repeats."""
    first = runs[0]
    points = []
    for index, point in enumerate(first.points):
        speedups = spread(run.points[index].speedup for run in runs)
        latency = spread(run.points[index].normalized_latency for run in runs)
        points.append(replace(point, speedup=speedups["median"], normalized_latency=latency["median"]))
    return replace(first, points=tuple(points))


def main(argv: list[str] | None = None) -> int:
    from bild.config import BiLDConfig
    from bild.eval.sweep import plot, run_sweep
    from bild.models import check_same_vocabulary, load_model

    parser = base_parser(__doc__)
    add_docsum_arguments(parser, limit=10)
    parser.add_argument("--small-unaligned", help="a second small model, the 'unaligned' series (e.g. smollm2-little-unaligned)")
    parser.add_argument("--fallback-thresholds", default="0.2,0.4,0.6", help="alpha_FB values (default: %(default)s)")
    parser.add_argument("--rollback-thresholds", default="2,5,15", help="alpha_RB values (default: %(default)s)")
    parser.add_argument("--max-small-steps", type=int, default=10, help="N (default: %(default)s)")
    args = parser.parse_args(argv)
    check_arguments(args)
    fallbacks = floats(args.fallback_thresholds, "--fallback-thresholds")
    rollbacks = floats(args.rollback_thresholds, "--rollback-thresholds")
    config = BiLDConfig(max_small_steps=args.max_small_steps, max_new_tokens=args.max_new_tokens)
    for fallback in fallbacks:  # every value is validated before any model loads
        replace(config, fallback_threshold=fallback)
    for rollback in rollbacks:
        replace(config, rollback_threshold=rollback)
    dataset = load_dataset(args)
    stamp = provenance(__file__, argv)
    path = result_path(QUESTION, stamp, args.results_dir)

    large = load_model(args.large)
    smalls = {"aligned": load_model(args.small, large=large)}
    if args.small_unaligned:
        smalls["unaligned"] = load_model(args.small_unaligned, large=large)
    for small in smalls.values():
        check_same_vocabulary(large, small)

    def once(warmup: int, progress):
        return run_sweep(large, smalls, dataset, fallbacks, rollbacks, config, warmup=warmup, on_progress=progress)[0]

    points = len(fallbacks) * len(rollbacks) * len(smalls)
    runs = run_repeats(once, args.repeats, len(dataset.examples), f"{points} points x {args.repeats}")
    medians = median_result(runs)
    results = {**medians.to_json(), "repeats": len(runs)}
    results["vanilla"]["time_s"] = spread(run.vanilla.time_s for run in runs)
    for index, point in enumerate(results["points"]):
        point["speedup"] = spread(run.points[index].speedup for run in runs)
        point["normalized_latency"] = spread(run.points[index].normalized_latency for run in runs)
        point["tokens_per_s"] = spread(run.points[index].summary.tokens_per_s for run in runs)
        point["time_s"] = spread(run.points[index].summary.time_s for run in runs)
    for series, picks in results["picks"].items():  # the picks as the points above, with their spreads
        for key, pick in picks.items():
            if pick is not None:
                picks[key] = next(point for point in results["points"] if point["series"] == series and
                                  (point["fallback_threshold"], point["rollback_threshold"]) ==
                                  (pick["fallback_threshold"], pick["rollback_threshold"]))
    plot_path = path.with_suffix(".png")
    print(f"{dataset.name}, n={medians.n}, {len(runs)} repeats, vanilla {medians.vanilla_quality:.2f}")
    for point in results["points"]:
        speed = point["speedup"]
        print(f"{point['series']:10s} fb {point['fallback_threshold']:<5g} rb {point['rollback_threshold']:<5g} "
              f"quality {point['quality']:6.2f}  {speed['median']:.2f}x [{speed['min']:.2f}-{speed['max']:.2f}]")
    write_result(path, QUESTION, stamp, settings_of(args), {**results, "plot": relative(plot_path)})
    plot(medians, plot_path, title=f"{dataset.name}, n={medians.n}: quality vs latency (median of {len(runs)})")
    print(f"plot: {relative(plot_path)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
