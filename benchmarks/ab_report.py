"""The table the A/B benchmark scripts print: one row per method of a docsum run (imported by those scripts)."""

from __future__ import annotations

from bild.eval.harness import EvalResult


def print_methods(result: EvalResult, max_new_tokens: int, threads: int) -> None:
    print(f"docsum, {result.n} examples, max_new_tokens {max_new_tokens}, {threads} threads; "
          "settings alpha_FB/alpha_RB/N")
    print(f"{'method':24s} {'ROUGE-L':>7s} {'speedup':>8s} {'exact':>6s} {'tok/pass':>8s} {'small s':>8s} {'large s':>8s}")
    for name, summary in result.summaries.items():
        per_pass = "-" if summary.tokens_per_large_pass is None else f"{summary.tokens_per_large_pass:.2f}"
        print(f"{name:24s} {summary.rougeL:7.2f} {summary.speedup:7.2f}x {summary.exact_match:6.2f} "
              f"{per_pass:>8s} {summary.small_time_s or 0.0:8.1f} {summary.large_time_s or 0.0:8.1f}")
