"""How often does each shipped drafter pick the large model's token, and what does one of its steps cost?

Agreement: teacher-forced top-1 agreement with the large model's greedy tokens on the held-out calibration records
(prompts about every tenth training-split docstring, never trained on; ``data/little-calibration.jsonl.gz``), the
figure `bild little` reports. Deterministic, so measured once. Cost: one single-token decode step with a KV cache,
through the engine's own decoders (an early exit through the cache it shares with the large model), the large model
and every drafter interleaved in each repeat after a warm-up; reported as the median over repeats with min and max,
and as a share of the large model's step in the same repeat.

    python benchmarks/drafter_cost.py --repeats 5 --threads 2
    python benchmarks/drafter_cost.py --candidate /tmp/little:aligned    # `bild little --out` weights beside them
"""

from __future__ import annotations

import gzip
import sys
import tempfile
from pathlib import Path

from common import (
    REPO, BenchmarkError, relative, base_parser, check_arguments, candidate_weights, load_candidate, main_guard,
    provenance, result_path, run_repeats, settings_of, spread, write_result,
)

QUESTION = "drafter-cost"
CALIBRATION = REPO / "data" / "little-calibration.jsonl.gz"
# drafter -> (built-in name, drafting as the engine loads it by that name); int8 False: the fp32 model as trained
DRAFTERS = {
    "smollm2-little-int8": ("smollm2-little-int8", True),
    "smollm2-little": ("smollm2-little", True),
    "smollm2-little (fp32 as trained)": ("smollm2-little", False),
    "smollm2-little-unaligned": ("smollm2-little-unaligned", True),
    "smollm2-early-exit": ("smollm2-early-exit", True),
}


def read_records(path: Path) -> list:
    """Calibration records with an output, from a .jsonl or .jsonl.gz file."""
    from bild.train.align import read_calibration

    if not path.is_file():
        raise BenchmarkError(f"calibration file {path} does not exist")
    if path.suffix != ".gz":
        return [record for record in read_calibration(path) if record.output_ids]
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "calibration.jsonl"
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        return [record for record in read_calibration(plain) if record.output_ids]


def load_drafter(name: str, int8: bool, large):
    """The drafter as the engine loads it by name, or (int8 False) its fp32 form as trained."""
    from bild.drafters.early_exit import load_exit
    from bild.drafters.little import VARIANTS, load_little
    from bild.models import load_model

    if int8:
        return load_model(name, large=large)
    if name in VARIANTS:
        return load_little(VARIANTS[name], large, int8=False)
    return load_exit(large, int8_head=False)


def main(argv: list[str] | None = None) -> int:
    from bild.models import DEFAULT_LARGE, load_model
    from bild.train.align import agreement
    from bild.train.early_exit import measure_step_costs
    from bild.train.little import LittleConfig, split_by_index

    parser = base_parser(__doc__)
    parser.set_defaults(repeats=5)
    parser.add_argument("--calibration", type=Path, default=CALIBRATION, help="(default: %(default)s)")
    parser.add_argument("--heldout-limit", type=int, help="use the first N held-out records (default: all)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per drafter and repeat (default: %(default)s)")
    parser.add_argument("--candidate", action="append", default=[], metavar="DIR:VARIANT",
                        help="weights written by `bild little --out DIR`, measured in both drafting forms (repeatable)")
    args = parser.parse_args(argv)
    check_arguments(args)
    config = LittleConfig()
    heldout = split_by_index(read_records(args.calibration), config.heldout_every)[1][: args.heldout_limit]
    if not heldout:
        raise BenchmarkError(f"no held-out records in {args.calibration}")
    stamp = provenance(__file__, argv)
    path = result_path(QUESTION, stamp, args.results_dir)

    large = load_model(DEFAULT_LARGE)
    drafters = {label: load_drafter(name, int8, large) for label, (name, int8) in DRAFTERS.items()}
    for candidate in args.candidate:  # as smollm2-little-int8 and as smollm2-little draft
        drafters[f"{candidate} (int8 layers)"] = load_candidate(candidate, large, int8_layers=True)
        drafters[candidate] = load_candidate(candidate, large)
    agreements = {}
    for label, drafter in drafters.items():
        agreements[label] = agreement(drafter, heldout, config.train)
        print(f"agreement {label}: {agreements[label]:.4f}", file=sys.stderr, flush=True)

    def once(_warmup: int, _progress) -> dict[str, float]:  # measure_step_costs warms up every decoder itself
        return measure_step_costs(large, drafters, steps=args.steps, rounds=1)

    runs = run_repeats(once, args.repeats, 1, f"decode steps x {args.repeats}")
    results = {
        "heldout_records": len(heldout),
        "heldout_target_tokens": sum(min(len(r.output_ids), config.train.max_target_tokens) for r in heldout),
        "calibration": relative(args.calibration),
        "repeats": args.repeats,
        "large": DEFAULT_LARGE,
        "candidate_weights_sha256": candidate_weights(args.candidate),
        "large_step_ms": spread(run["large"] for run in runs),
        "drafters": {
            label: {
                "agreement": agreements[label],
                "int8_head": DRAFTERS[label][1] if label in DRAFTERS else True,
                "step_ms": spread(run[label] for run in runs),
                "cost_ratio": spread(run[label] / run["large"] for run in runs),
            }
            for label in drafters
        },
    }
    print(f"held-out: {results['heldout_records']} records, {results['heldout_target_tokens']} tokens; "
          f"large step {results['large_step_ms']['median']:.1f} ms")
    for label, row in results["drafters"].items():
        ratio = row["cost_ratio"]
        print(f"{label:34s} agreement {row['agreement']:.4f}  step {row['step_ms']['median']:6.1f} ms = "
              f"{ratio['median']:.1%} of the large model's [{ratio['min']:.1%}-{ratio['max']:.1%}]")
    write_result(path, QUESTION, stamp, settings_of(args), results)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
