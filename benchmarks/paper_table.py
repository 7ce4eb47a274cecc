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

from common import (
    add_docsum_arguments, add_method_arguments, base_parser, check_arguments, chosen_methods, main_guard, run_harness,
)

QUESTION = "paper-table"
PAPER_METHODS = ("vanilla,bild,bild-fixed,bild-lossless,bild-lossless-fixed,hf-assisted,hf-prompt-lookup,speculative,"
                 "small,bild-no-rollback,bild-no-fallback")


def main(argv: list[str] | None = None) -> int:
    from bild.eval.methods import build_method

    parser = base_parser(__doc__)
    add_docsum_arguments(parser)
    add_method_arguments(parser, PAPER_METHODS)
    parser.add_argument("--draft-window", type=int, default=5, help="draft tokens per pass of 'speculative' (default: %(default)s)")
    args = parser.parse_args(argv)
    check_arguments(args)
    names, config = chosen_methods(args)
    return run_harness(QUESTION, __file__, args, argv, config,
                       lambda context: {name: build_method(name, context) for name in names})


if __name__ == "__main__":
    sys.exit(main_guard(main))
