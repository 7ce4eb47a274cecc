"""How often does a drafter pick the large model's token on prompts of every kind?

Teacher-forced top-1 agreement, as the drafter drafts (the engine's form: the shipped little models with their int8
drafting head): for every prompt, the large model's greedy answer (bild's loop, --max-new-tokens), then one forward
pass of each drafter over the prompt and that answer; agreement = the share of answer tokens (the first, which the
prefill writes, left out) that are the drafter's top-1 given the large model's tokens before them. Per kind of a
tagged set (the built-in mixed set: --per-kind K of each) and overall, for each dataset given. Deterministic, so
measured once (no repeats); the figure BiLD's speed follows (benchmarks/adaptive.py turns it into the speedup a
perfect lossless policy would reach).

    python benchmarks/agreement.py --datasets mixed,docsum --per-kind 8 --limit 24
    python benchmarks/agreement.py --candidate /tmp/little-broad:aligned    # a `bild little --out` directory too
"""

from __future__ import annotations

import sys

from adaptive import teacher_forced_agreement
from common import (
    BenchmarkError, base_parser, candidate_weights, load_candidate, main_guard, provenance, result_path, settings_of,
    write_result,
)

QUESTION = "agreement"


def load_drafters(large, names: list[str], candidates: list[str]) -> dict:
    """label -> drafter: built-in names (as the engine loads them) and ``DIR:variant`` weights from `bild little`."""
    from bild.models import load_model

    drafters = {name: load_model(name, large=large) for name in names}
    drafters.update({candidate: load_candidate(candidate, large) for candidate in candidates})
    return drafters


def measure(engine, drafters: dict, dataset, config) -> dict:
    """drafter -> kind -> {agreement, tokens}, with "overall"."""
    counts = {label: {} for label in drafters}
    chat = engine.pair.large.is_chat
    for example in dataset.examples:
        prompt_ids = engine.encode(dataset.prompt(example), chat=chat)
        output = engine.vanilla_ids(prompt_ids, config).token_ids
        for label, drafter in drafters.items():
            agrees = teacher_forced_agreement(drafter, prompt_ids, output)[1:]
            for kind in (example.kind or dataset.name, "overall"):
                hits, total = counts[label].get(kind, (0, 0))
                counts[label][kind] = (hits + sum(agrees), total + len(agrees))
    return {label: {kind: {"agreement": hits / total if total else None, "tokens": total}
                    for kind, (hits, total) in kinds.items()} for label, kinds in counts.items()}


def main(argv: list[str] | None = None) -> int:
    import torch

    from bild.config import BiLDConfig
    from bild.decoding import BiLD
    from bild.eval.datasets import load_dataset
    from bild.models import DEFAULT_LARGE, ModelPair, load_model

    parser = base_parser(__doc__)
    parser.set_defaults(repeats=1)
    parser.add_argument("--datasets", default="mixed,docsum", help="comma-separated (default: %(default)s)")
    parser.add_argument("--per-kind", type=int, default=8, help="examples of each kind of a tagged set (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=24, help="examples of an untagged set (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="(default: %(default)s)")
    parser.add_argument("--large", default=DEFAULT_LARGE, help="(default: %(default)s)")
    parser.add_argument("--drafters", default="smollm2-little-int8,smollm2-little,smollm2-little-unaligned",
                        help="built-in drafters (default: %(default)s)")
    parser.add_argument("--candidate", action="append", default=[], metavar="DIR:VARIANT",
                        help="weights written by `bild little --out DIR` (repeatable)")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.per_kind < 1 or args.limit < 1:
        raise BenchmarkError("--threads, --per-kind and --limit must be >= 1")
    torch.set_num_threads(args.threads)
    stamp = provenance(__file__, argv)
    path = result_path(QUESTION, stamp, args.results_dir)
    large = load_model(args.large)
    drafters = load_drafters(large, [name for name in args.drafters.split(",") if name], args.candidate)
    engine = BiLD(ModelPair(large=large, small=None))
    config = BiLDConfig(max_new_tokens=args.max_new_tokens)
    results = {"max_new_tokens": args.max_new_tokens, "candidate_weights_sha256": candidate_weights(args.candidate),
               "datasets": {}}
    for name in [name for name in args.datasets.split(",") if name]:
        dataset = load_dataset(name, per_kind=args.per_kind if name == "mixed" else None,
                               limit=None if name == "mixed" else args.limit)
        print(f"{name}: {len(dataset.examples)} prompts", file=sys.stderr)
        results["datasets"][name] = {"n": len(dataset.examples), "drafters": measure(engine, drafters, dataset, config)}
    for name, data in results["datasets"].items():
        for label, kinds in data["drafters"].items():
            cells = " ".join(f"{kind} {row['agreement']:.1%}" for kind, row in kinds.items())
            print(f"{name:8s} {label:40s} {cells}")
    write_result(path, QUESTION, stamp, settings_of(args), results)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
