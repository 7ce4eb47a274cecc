"""Lossless BiLD (alpha_RB = 0): how much faster than the large model alone, with exactly its greedy output?

With alpha_RB = 0 every drafted token the large model would not have picked is replaced, so BiLD returns the large
model's greedy text; alpha_FB and N then only decide how much the small model drafts per large pass, i.e. the speed.
Runs lossless BiLD at a few (alpha_FB, N) settings next to vanilla (transformers' generate) and, by default,
transformers' assisted generation (lossless too), interleaved per example; exact match must be 1.00 everywhere.

    python benchmarks/lossless.py --limit 20 --repeats 3 --threads 2
"""

from __future__ import annotations

import sys

from common import BenchmarkError, add_docsum_arguments, base_parser, check_arguments, main_guard, parse_setting, run_harness

QUESTION = "lossless"


def main(argv: list[str] | None = None) -> int:
    from bild.config import BiLDConfig
    from bild.eval.methods import bild_method, build_method

    parser = base_parser(__doc__)
    add_docsum_arguments(parser)
    parser.add_argument("--settings", default="0.6/10,0.4/3,0.2/1",
                        help="comma-separated alpha_FB/N of lossless BiLD (default: %(default)s)")
    parser.add_argument("--no-hf-assisted", action="store_true", help="leave out transformers' assisted generation")
    args = parser.parse_args(argv)
    check_arguments(args)
    settings = [parse_setting(text) for text in args.settings.split(",") if text]
    if not settings or any(rollback is not None for _, rollback, _ in settings):
        raise BenchmarkError(f"--settings takes alpha_FB/N pairs (alpha_RB is 0 here), got {args.settings!r}")
    config = BiLDConfig(rollback_threshold=0.0, max_new_tokens=args.max_new_tokens)

    def build(context) -> dict:
        methods = {"vanilla": build_method("vanilla", context)}
        if not args.no_hf_assisted:
            methods["hf-assisted"] = build_method("hf-assisted", context)
        for fallback, _, window in settings:
            methods[f"bild-lossless {fallback:g}/{window}"] = bild_method(
                context, fallback_threshold=fallback, rollback_threshold=0.0, max_small_steps=window)
        return methods

    return run_harness(QUESTION, __file__, args, argv, config, build)


if __name__ == "__main__":
    sys.exit(main_guard(main))
