"""Does int8 drafting with a draft vocabulary make BiLD faster, and at what quality? An A/B in one run.

"int8-head": the little model as shipped before 2026-11-27 (fp32 decoder layers, int8 copy of the full 49,152-row
head). "int8-draft": as shipped now (int8 decoder layers, int8 head over the 8,192-token draft vocabulary stored with
the weights; bild.quantize). Both are the same trained weights. For every setting, BiLD with each drafter runs on
the same docsum examples, interleaved per example with vanilla (transformers generate) after a warm-up.

    python benchmarks/drafting_ab.py --limit 60 --threads 2 > benchmarks/drafting-ab.log
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from bild import BiLD, BiLDConfig
from bild.eval.datasets import load_dataset
from bild.eval.harness import run_methods
from bild.eval.methods import MethodContext, bild_method, build_method
from bild.little import load_little
from bild.models import DEFAULT_LARGE, ModelPair, load_model
from bild.quantize import quantize_output_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--settings", default="0.2/7/10,0.1/7/6,0.2/0/1",
                        help="comma-separated alpha_FB/alpha_RB/N (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    large = load_model(DEFAULT_LARGE)
    old = load_little("aligned", large, int8=False)
    quantize_output_layer(old.model)  # the previous shipped form: int8 head over the whole vocabulary
    drafters = {"int8-head": old, "int8-draft": load_little("aligned", large)}
    base = BiLDConfig(max_new_tokens=args.max_new_tokens)
    contexts = {name: MethodContext(ModelPair(large, small), BiLD(ModelPair(large, small)), base)
                for name, small in drafters.items()}
    methods = {"vanilla": build_method("vanilla", contexts["int8-draft"])}
    for setting in args.settings.split(","):
        fallback, rollback, window = setting.split("/")
        for name, context in contexts.items():
            methods[f"{name} {setting}"] = bild_method(
                context, fallback_threshold=float(fallback), rollback_threshold=float(rollback),
                max_small_steps=int(window))
    dataset = load_dataset("docsum", limit=args.limit)
    pair, engine = contexts["int8-draft"].pair, contexts["int8-draft"].engine
    result = run_methods(pair, engine, dataset, methods, replace(base))
    print(f"docsum, {result.n} examples, max_new_tokens {args.max_new_tokens}, {args.threads} threads; "
          "settings alpha_FB/alpha_RB/N")
    print(f"{'method':22s} {'ROUGE-L':>7s} {'speedup':>8s} {'exact':>6s} {'tok/pass':>8s} {'small s':>8s}")
    for name, summary in result.summaries.items():
        small_s = summary.small_time_s or 0.0
        per_pass = "-" if summary.tokens_per_large_pass is None else f"{summary.tokens_per_large_pass:.2f}"
        print(f"{name:22s} {summary.rougeL:7.2f} {summary.speedup:7.2f}x {summary.exact_match:6.2f} "
              f"{per_pass:>8s} {small_s:8.1f}")


if __name__ == "__main__":
    main()
