"""Is BiLD with the adaptive policy at least as fast as the large model alone on prompts unlike the little model's
training text, and how close does lossless BiLD come to what a perfect policy could reach?

On the built-in mixed set by default (six kinds of prompt: translate, summarize, question, passage, arithmetic,
write; --per-kind K takes the first K of each): the large model alone (vanilla, transformers' generate: the
baseline), BiLD and lossless BiLD under the adaptive and the fixed policy at the paper's thresholds, and transformers'
assisted generation with the same small model, interleaved per example after a warm-up, each of --repeats runs giving
the latency ratio (speedup) and the throughput ratio (tokens/s) over vanilla, overall and per kind.

The ceiling: before the timed runs, the large model's greedy output for every prompt and the small model's
teacher-forced top-1 agreement with it at every position; a perfect lossless policy drafts exactly the runs the large
model will accept (at most N), never a token it will reject, and pays the engine's measured costs (a small step, a
large pass over one token and what each further token adds). Its speedup over the large model alone, per kind, is
the most any lossless drafting policy could get from this small model on these prompts (the prefill, the same for
both, left out). It is reported beside the measured lossless speedups.

    python benchmarks/adaptive.py --dataset mixed --per-kind 4 --max-new-tokens 48 --repeats 3 --threads 2
    python benchmarks/adaptive.py --dataset docsum --limit 20 --repeats 3 --threads 2
"""

from __future__ import annotations

import sys

import torch

from common import (
    add_docsum_arguments, add_method_arguments, base_parser, check_arguments, chosen_methods, main_guard, run_harness,
)

QUESTION = "adaptive"
METHODS = "vanilla,bild,bild-fixed,bild-lossless,bild-lossless-fixed,hf-assisted"


def perfect_policy_cost(agrees: list[bool], costs, longest: int) -> float:
    """Decode cost of the output under a perfect lossless policy: each round drafts the run of tokens the large model
    will accept (at most ``longest``) and one large pass checks them and adds the next token; where the small model
    would be wrong at once, the large model steps alone. The first token comes from the prefill."""
    cost, position = 0.0, 1
    while position < len(agrees):
        run = 0
        while run < longest and position + run < len(agrees) and agrees[position + run]:
            run += 1
        cost += costs.round_time(run) if run else costs.large_base
        position += run + 1
    return cost


@torch.inference_mode()
def teacher_forced_agreement(small, prompt_ids: list[int], output_ids: list[int]) -> list[bool]:
    """Per output token: is it the small model's top-1 given the prompt and the large model's tokens before it?"""
    model = small.model
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + output_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
    return (logits.argmax(-1).cpu() == torch.tensor(output_ids)).tolist()


def ceiling(context, dataset) -> dict:
    """Teacher-forced agreement and the perfect lossless policy's speedup, per kind and overall (module docstring)."""
    engine, config = context.engine, context.config
    chat = engine.pair.large.is_chat
    prompts = [engine.encode(dataset.prompt(example), chat=chat) for example in dataset.examples]
    costs = engine.measure_costs(prompts[0], config.max_small_steps)
    totals: dict[str, list[float]] = {}  # kind -> [agreeing tokens, tokens, vanilla cost, perfect cost]
    for example, prompt_ids in zip(dataset.examples, prompts):
        output = engine.vanilla_ids(prompt_ids, config).token_ids
        agrees = teacher_forced_agreement(engine.pair.small, prompt_ids, output)
        for kind in (example.kind or "all", "overall"):
            row = totals.setdefault(kind, [0.0, 0.0, 0.0, 0.0])
            row[0] += sum(agrees[1:])
            row[1] += len(agrees) - 1
            row[2] += (len(agrees) - 1) * costs.large_base
            row[3] += perfect_policy_cost(agrees, costs, config.max_small_steps)
    return {"ceiling": {
        "costs_ms": {"small_step": costs.small_step * 1e3, "large_base": costs.large_base * 1e3,
                     "large_per_token": costs.large_per_token * 1e3},
        "kinds": {kind: {"agreement": agree / tokens if tokens else None,
                         "perfect_lossless_speedup": vanilla / perfect if perfect else None}
                  for kind, (agree, tokens, vanilla, perfect) in totals.items()},
    }}


def main(argv: list[str] | None = None) -> int:
    from bild.eval.methods import build_method

    parser = base_parser(__doc__)
    add_docsum_arguments(parser)
    parser.set_defaults(dataset="mixed")
    add_method_arguments(parser, METHODS)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the perfect-policy ceiling")
    args = parser.parse_args(argv)
    check_arguments(args)
    names, config = chosen_methods(args)

    def measured_ceiling(context, dataset) -> dict:
        result = ceiling(context, dataset)
        print("perfect lossless policy (teacher-forced agreement, measured costs):", file=sys.stderr)
        for kind, row in result["ceiling"]["kinds"].items():
            print(f"  {kind:12s} agreement {row['agreement']:.1%}, ceiling {row['perfect_lossless_speedup']:.2f}x",
                  file=sys.stderr)
        return result

    return run_harness(QUESTION, __file__, args, argv, config,
                       lambda context: {name: build_method(name, context) for name in names},
                       before=None if args.no_ceiling else measured_ceiling)


if __name__ == "__main__":
    sys.exit(main_guard(main))
