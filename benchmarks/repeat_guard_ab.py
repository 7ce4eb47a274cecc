"""What does the repetition guard (BiLDConfig.repeat_ngram, not in the paper) buy and cost? An A/B in one run.

The shipped little model drafts with the guard off and at a few n-gram sizes, at a few threshold settings, on the
same docsum examples, interleaved per example with vanilla after a warm-up; rep-4 (share of repeated word 4-grams,
bild.eval.metrics.repetition) shows the loops, ROUGE-L the quality, speedup the cost.

    python benchmarks/repeat_guard_ab.py --limit 60 --threads 2 > benchmarks/repeat-guard-ab.log
"""

from __future__ import annotations

import torch

from common import ab_parser, print_methods
from bild import BiLDConfig
from bild.decoding import BiLD
from bild.eval.datasets import load_dataset
from bild.eval.harness import run_methods
from bild.eval.methods import MethodContext, bild_method, build_method
from bild.drafters.little import load_little
from bild.models import DEFAULT_LARGE, ModelPair, load_model


def main() -> None:
    parser = ab_parser(__doc__, settings="0.6/5/10,0.1/15/10")
    parser.add_argument("--ngrams", default="0,4,8", help="comma-separated repeat_ngram values; 0 = off (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large = load_model(DEFAULT_LARGE)
    pair = ModelPair(large, load_little("aligned", large))
    base = BiLDConfig(max_new_tokens=args.max_new_tokens)
    context = MethodContext(pair, BiLD(pair), base)
    methods = {"vanilla": build_method("vanilla", context)}
    for setting in args.settings.split(","):
        fallback, rollback, window = setting.split("/")
        for ngram in (int(n) for n in args.ngrams.split(",")):
            methods[f"guard {ngram} {setting}"] = bild_method(
                context, fallback_threshold=float(fallback), rollback_threshold=float(rollback),
                max_small_steps=int(window), repeat_ngram=ngram)
    result = run_methods(pair, context.engine, load_dataset("docsum", limit=args.limit), methods, base)
    print_methods(result, args.max_new_tokens, args.threads)


if __name__ == "__main__":
    main()
