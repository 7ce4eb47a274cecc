"""Is BiLD with the adaptive policy at least as fast as the large model alone on prompts unlike the little model's
training text, and how close does lossless BiLD come to what a perfect policy could reach?

On the built-in mixed set by default (six kinds of prompt: translate, summarize, question, passage, arithmetic,
write; --per-kind K takes the first K of each): the large model alone (vanilla, transformers' generate: the
baseline), BiLD and lossless BiLD under the adaptive and the fixed policy at the paper's thresholds, and transformers'
assisted generation with the same small model, interleaved per example after a warm-up, each of --repeats runs giving
the latency ratio (speedup) and the throughput ratio (tokens/s) over vanilla, overall and per kind.

The ceiling: before the timed runs, the large model's greedy output for every prompt and the small model's
teacher-forced top-1 agreement with it at every position; a perfect lossless policy drafts exactly the runs the large
model will accept (at most N), never a token it will reject, and pays the engine's measured costs (a draft step, a
large pass over 1, 2, ... N + 1 tokens). Its speedup over the large model alone, per kind, is
the most any lossless drafting policy could get from this small model on these prompts (the prefill, the same for
both, left out). It is reported beside the measured lossless speedups.

The replay: the same data drive the engine's own policy code (BiLD._plan_round and BiLD._adapt) round by round,
with the small model's teacher-forced confidence deciding fallbacks and the large model's NLL of its top-1 deciding
rollbacks; each round is charged the measured costs. It models each policy's speedup without a clock (so a policy
change can be compared on many prompts in a minute; --replay-only skips the timed runs). Lossless it is exact up
to the confidences after a rejected draft (taken teacher-forced, where the small model would continue from its own
wrong token); at alpha_RB > 0 it assumes that an accepted token other than the large model's pick leaves the rest
of the output as it was, so it is an approximation there.

    python benchmarks/adaptive.py --dataset mixed --per-kind 4 --max-new-tokens 48 --repeats 3 --threads 2
    python benchmarks/adaptive.py --dataset docsum --limit 20 --repeats 3 --threads 2
    python benchmarks/adaptive.py --dataset mixed --per-kind 8 --max-new-tokens 64 --replay-only --threads 2
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from common import (
    BenchmarkError, add_docsum_arguments, add_method_arguments, base_parser, check_arguments, chosen_methods,
    main_guard, run_harness,
)

QUESTION = "adaptive"
METHODS = "vanilla,bild,bild-fixed,bild-lossless,bild-lossless-fixed,hf-assisted"


def perfect_policy_cost(agrees: list[bool], costs, longest: int, free: list[bool] | None = None) -> float:
    """Decode cost of the output under a perfect lossless policy: each round drafts the run of tokens the large model
    will accept (at most ``longest``) and one large pass checks them and adds the next token; where the small model
    would be wrong at once, the large model steps alone. The first token comes from the prefill. free: per token,
    a lookup draft would propose it (then the perfect policy takes it without a small step)."""
    free = free or [False] * len(agrees)
    cost, position = 0.0, 1
    while position < len(agrees):
        run = 0
        while run < longest and position + run < len(agrees) and (agrees[position + run] or free[position + run]):
            run += 1
        small_steps = sum(not free[position + index] for index in range(run))
        cost += small_steps * costs.small_step + costs.large_pass(run + 1)
        position += run + 1
    return cost


def lookup_hits(prompt_ids: list[int], output_ids: list[int], n: int) -> list[bool]:
    """Per output token: would a lookup draft (bild.policies.lookup_draft over the prompt and the output before it)
    propose it?"""
    from bild.policies import index_ngrams, lookup_draft

    index: dict = {}
    tokens, hits = list(prompt_ids), []
    for token in output_ids:
        index_ngrams(index, tokens, len(tokens) - 1 if hits else 0, len(tokens), n)  # the one new position
        hits.append(lookup_draft(tokens, index, n) == token)
        tokens.append(token)
    return hits


@torch.inference_mode()
def teacher_forced_agreement(small, prompt_ids: list[int], output_ids: list[int]) -> list[bool]:
    """Per output token: is it the small model's top-1 given the prompt and the large model's tokens before it?"""
    return teacher_forced_trace(small, None, prompt_ids, output_ids).agrees


@dataclass(frozen=True)
class Trace:
    """Per output token of the large model's greedy output, teacher-forced on the tokens before it."""

    agrees: list[bool]  # the small model's top-1 is the large model's token
    confidence: list[float]  # the small model's top-1 probability (what the fallback policy compares with alpha_FB)
    nll: list[float]  # the large model's NLL of the small model's top-1 (what the rollback policy compares)


@torch.inference_mode()
def teacher_forced_trace(small, large, prompt_ids: list[int], output_ids: list[int]) -> Trace:
    """The :class:`Trace` of ``output_ids``; ``large`` None leaves ``nll`` empty. The small model drafts the prompt's
    tokens too, as in the engine (bild.drafters.quantize.drafting_also)."""
    from bild.drafters.quantize import drafting_also

    ids = torch.tensor([prompt_ids + output_ids], device=next(small.model.parameters()).device)
    window = slice(len(prompt_ids) - 1, -1)
    with drafting_also(small.model, tuple(prompt_ids)):
        probs = small.model(input_ids=ids).logits[0, window].float().softmax(-1)
    confidence, top = probs.max(-1)
    nll = []
    if large is not None:
        large_ids = ids.to(next(large.model.parameters()).device)
        log_probs = large.model(input_ids=large_ids).logits[0, window].float().log_softmax(-1)
        nll = (-log_probs.gather(-1, top.to(log_probs.device)[:, None])[:, 0]).tolist()
    return Trace((top.cpu() == torch.tensor(output_ids)).tolist(), confidence.tolist(), nll)


def replay_cost(engine, config, trace: Trace, prompt_ids: list[int] = (), output_ids: list[int] = ()) -> float:
    """Decode cost of the output under ``config``'s policy, replayed round by round through the engine's own policy
    code (module docstring); ``engine.costs`` must be set. The first round's large pass is the prefill, which the
    large model alone pays as well: left out, as in :func:`perfect_policy_cost`. Lookup drafts (config.lookup_ngram;
    none without ``output_ids``) come from the engine's lookup code over the prompt, the output so far and the
    round's drafts; they are accepted when they are the output's token and cost no small step."""
    from bild.decoding import _Run
    from bild.policies import index_ngrams, lookup_draft, should_fall_back

    run = _Run(tokens=[], output_start=0, checked=0)
    adaptation = engine._start_adaptation(config, []) if config.policy == "adaptive" else None
    lookup = config.lookup_ngram if output_ids else 0
    index: dict = {}
    indexed, cost, position, length = 0, -engine.costs.large_base, 0, len(trace.agrees)
    while position < length:
        engine._plan_round(run, config, adaptation)
        tokens = list(prompt_ids) + list(output_ids[:position])
        if lookup:
            index_ngrams(index, tokens, indexed, len(tokens), lookup)
            indexed = len(tokens)
        by_small: list[bool] = []  # per draft of the round: from the small model (else from lookup)
        good: list[bool] = []  # ... and would the large model keep it
        dropped = 0
        while len(good) < config.max_small_steps and position + len(good) < length:
            target = position + len(good)
            proposal = lookup_draft(tokens, index, lookup) if lookup else None
            if proposal is not None:
                by_small.append(False)
                good.append(proposal == output_ids[target])
                tokens.append(proposal)
                continue
            small_drafts = sum(by_small)
            if small_drafts >= run.draft_cap or not all(by_small):  # no small drafts after lookup drafts
                break
            if should_fall_back(trace.confidence[target], small_drafts, run.fallback_threshold, run.draft_cap):
                dropped = 1
                break
            by_small.append(True)
            good.append(trace.agrees[target] or trace.nll[target] <= config.rollback_threshold)
            tokens.append(output_ids[target] if output_ids and trace.agrees[target] else -1)  # -1: some other token
        accepted = good.index(False) if False in good else len(good)
        cost += sum(by_small) * engine.costs.small_step + engine.costs.large_pass(len(good) + 1)
        cost += dropped * engine.costs.small_step
        if adaptation is not None:
            engine._learn(run, config, adaptation, by_small, accepted, dropped)
        position += accepted + 1
    return cost


REPLAYED = {"bild": {}, "bild-fixed": {"policy": "fixed"}, "bild-lossless": {"rollback_threshold": 0.0},
            "bild-lossless-fixed": {"rollback_threshold": 0.0, "policy": "fixed"},
            "bild-no-lookup": {"lookup": 0}, "bild-lossless-no-lookup": {"rollback_threshold": 0.0, "lookup": 0}}


def ceiling(context, dataset) -> dict:
    """Teacher-forced agreement, the perfect lossless policy's speedup and each policy's replayed speedup, per kind
    and overall (module docstring)."""
    engine, config = context.engine, context.config
    chat = engine.pair.large.is_chat
    prompts = [engine.encode(dataset.prompt(example), chat=chat) for example in dataset.examples]
    costs = engine.measure_costs(prompts[0], config.max_small_steps)
    engine.costs = costs  # the timed runs share the engine: their adaptive policy plans with the costs replayed here
    totals: dict[str, dict[str, float]] = {}  # kind -> agreeing tokens, tokens, vanilla cost, perfect/replayed costs
    for example, prompt_ids in tqdm(list(zip(dataset.examples, prompts)), desc="ceiling and replay", unit="ex",
                                    file=sys.stderr, dynamic_ncols=True):
        output = engine.vanilla_ids(prompt_ids, config).token_ids
        trace = teacher_forced_trace(engine.pair.small, engine.pair.large, prompt_ids, output)
        row = {"agree": sum(trace.agrees[1:]), "tokens": len(output) - 1,
               "vanilla": (len(output) - 1) * costs.large_base,
               "perfect": perfect_policy_cost(trace.agrees, costs, config.max_small_steps)}
        if config.lookup_ngram:
            hits = lookup_hits(prompt_ids, output, config.lookup_ngram)
            row["perfect-lookup"] = perfect_policy_cost(trace.agrees, costs, config.max_small_steps, hits)
        for name, change in REPLAYED.items():
            row[name] = replay_cost(engine, replace(config, **change), trace, prompt_ids, output)
        for kind in (example.kind or "all", "overall"):
            total = totals.setdefault(kind, dict.fromkeys(row, 0.0))
            for key, value in row.items():
                total[key] += value
    return {"ceiling": {
        "costs_ms": {"small_step": costs.small_step * 1e3, "large_base": costs.large_base * 1e3,
                     "large_per_token": costs.large_per_token * 1e3,
                     "large_passes": [seconds * 1e3 for seconds in costs.large_passes]},
        "kinds": {kind: {"agreement": row["agree"] / row["tokens"] if row["tokens"] else None,
                         "perfect_lossless_speedup": row["vanilla"] / row["perfect"] if row["perfect"] else None,
                         "perfect_lossless_speedup_with_lookup": (row["vanilla"] / row["perfect-lookup"]
                                                                  if row.get("perfect-lookup") else None),
                         "replayed_speedup": {name: row["vanilla"] / row[name] if row[name] else None
                                              for name in REPLAYED}}
                  for kind, row in totals.items()},
    }}


def main(argv: list[str] | None = None) -> int:
    from bild.eval.methods import build_method

    parser = base_parser(__doc__)
    add_docsum_arguments(parser)
    parser.set_defaults(dataset="mixed")
    add_method_arguments(parser, METHODS)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the perfect-policy ceiling and the replay")
    parser.add_argument("--replay-only", action="store_true",
                        help="only the ceiling and the replayed policies: no timed runs (about a minute)")
    args = parser.parse_args(argv)
    check_arguments(args)
    if args.replay_only and args.no_ceiling:
        raise BenchmarkError("--replay-only and --no-ceiling leave nothing to run")
    names, config = chosen_methods(args)

    def measured_ceiling(context, dataset) -> dict:
        result = ceiling(context, dataset)
        print("perfect lossless policy and replayed policies (teacher-forced, measured costs):", file=sys.stderr)
        for kind, row in result["ceiling"]["kinds"].items():
            replayed = " ".join(f"{name} {value:.2f}x" for name, value in row["replayed_speedup"].items())
            with_lookup = row["perfect_lossless_speedup_with_lookup"]
            lookup = f" ({with_lookup:.2f}x with lookup drafts)" if with_lookup else ""
            print(f"  {kind:12s} agreement {row['agreement']:.1%}, ceiling {row['perfect_lossless_speedup']:.2f}x"
                  f"{lookup}, replayed: {replayed}", file=sys.stderr)
        return result

    return run_harness(QUESTION, __file__, args, argv, config,
                       lambda context: {name: build_method(name, context) for name in names},
                       before=None if args.no_ceiling else measured_ceiling, timed=not args.replay_only)


if __name__ == "__main__":
    sys.exit(main_guard(main))
