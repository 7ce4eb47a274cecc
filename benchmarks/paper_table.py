"""The paper's Table 1 on this machine: every method at the paper's thresholds (alpha_FB 0.6, alpha_RB 5, N 10).

On the built-in docsum set (one-sentence summaries of Python standard-library docstrings) by default: the large model
alone (vanilla, transformers' generate: the baseline), BiLD, lossless BiLD (alpha_RB = 0), transformers' assisted
generation with the same small model, fixed-window speculative decoding, the small model alone, and the paper's two
ablations (no rollback, no fallback). Methods run interleaved per example (order rotated) after an untimed warm-up;
each of --repeats runs gives speedup = sum of vanilla's times / sum of the method's times, reported as the median
with min and max. Quality and BiLD statistics are those of greedy decoding, the same in every repeat.

    python benchmarks/paper_table.py --limit 20 --repeats 3 --threads 2
"""

from __future__ import annotations

import sys

from common import BenchmarkError, add_docsum_arguments, base_parser, check_arguments, main_guard, run_harness

QUESTION = "paper-table"
PAPER_METHODS = ("vanilla,bild,bild-fixed,bild-lossless,bild-lossless-fixed,hf-assisted,speculative,small,"
                 "bild-no-rollback,bild-no-fallback")


def main(argv: list[str] | None = None) -> int:
    from bild.config import BiLDConfig
    from bild.eval.methods import build_method, method_names

    parser = base_parser(__doc__)
    add_docsum_arguments(parser)
    parser.add_argument("--methods", default=PAPER_METHODS, help="comma-separated; vanilla always runs (default: %(default)s)")
    parser.add_argument("--fallback-threshold", type=float, default=0.6, help="alpha_FB (default: %(default)s)")
    parser.add_argument("--rollback-threshold", type=float, default=5.0, help="alpha_RB (default: %(default)s)")
    parser.add_argument("--max-small-steps", type=int, default=10, help="N (default: %(default)s)")
    parser.add_argument("--repeat-ngram", type=int, default=BiLDConfig().repeat_ngram,
                        help="bild's repetition guard (not in the paper); 0 = off (default: %(default)s)")
    parser.add_argument("--draft-window", type=int, default=5, help="draft tokens per pass of 'speculative' (default: %(default)s)")
    args = parser.parse_args(argv)
    check_arguments(args)
    names = ["vanilla"] + [name for name in dict.fromkeys(args.methods.split(",")) if name and name != "vanilla"]
    unknown = [name for name in names if name not in method_names()]
    if unknown:
        raise BenchmarkError(f"unknown method {', '.join(unknown)}; choose from {', '.join(method_names())}")
    config = BiLDConfig(fallback_threshold=args.fallback_threshold, rollback_threshold=args.rollback_threshold,
                        max_small_steps=args.max_small_steps, max_new_tokens=args.max_new_tokens,
                        repeat_ngram=args.repeat_ngram)
    return run_harness(QUESTION, __file__, args, argv, config,
                       lambda context: {name: build_method(name, context) for name in names})


if __name__ == "__main__":
    sys.exit(main_guard(main))
