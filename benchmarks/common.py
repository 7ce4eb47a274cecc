"""Helpers shared by the benchmark scripts (imported by them; run the scripts from the repository root)."""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Mapping

import torch

from bild.eval.harness import EvalResult
from bild.eval.methods import Method


def measure_pass_ms(model: torch.nn.Module, widths: range, setups: Mapping[str, Callable[[], None]],
                    rounds: int = 7, prefix_len: int = 150) -> dict[str, dict[int, float]]:
    """Median ms of one cached forward pass over k new tokens after a ``prefix_len`` prefill, for each setup.

    setups: name -> a call that puts the model in that setup (e.g. its kernels). Setups and widths are interleaved
    within every round, after one untimed warm-up round (which also lets lazily prepared kernels prepare).
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (1, prefix_len + max(widths)), generator=generator)
    with torch.inference_mode():
        prefix_cache = model(ids[:, :prefix_len], use_cache=True).cache
    times: dict[str, dict[int, list[float]]] = {name: {width: [] for width in widths} for name in setups}
    for round_index in range(rounds + 1):
        for name, setup in setups.items():
            setup()
            for width in widths:
                cache = copy.deepcopy(prefix_cache)
                started = time.perf_counter()
                with torch.inference_mode():
                    model(ids[:, prefix_len : prefix_len + width], cache=cache, use_cache=True, logits_to_keep=width)
                if round_index:
                    times[name][width].append((time.perf_counter() - started) * 1000)
    return {name: {width: statistics.median(ms) for width, ms in by_width.items()} for name, by_width in times.items()}


def ab_parser(doc: str, settings: str) -> argparse.ArgumentParser:
    """The arguments every docsum A/B script takes; a script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--settings", default=settings, help="comma-separated alpha_FB/alpha_RB/N (default: %(default)s)")
    return parser


def with_setup(method: Method, setup: Callable[[], None]) -> Method:
    """The method, preceded on every call by ``setup`` (e.g. switching the large model's kernels for this arm)."""

    def call(request):
        setup()
        return method(request)

    return call


def print_methods(result: EvalResult, max_new_tokens: int, threads: int) -> None:
    """The table the A/B scripts print: one row per method of a docsum run."""
    print(f"docsum, {result.n} examples, max_new_tokens {max_new_tokens}, {threads} threads; "
          "settings alpha_FB/alpha_RB/N")
    print(f"{'method':24s} {'ROUGE-L':>7s} {'rep-4':>6s} {'speedup':>8s} {'exact':>6s} {'tok/pass':>8s} {'small s':>8s} "
          f"{'large s':>8s}")
    for name, summary in result.summaries.items():
        per_pass = "-" if summary.tokens_per_large_pass is None else f"{summary.tokens_per_large_pass:.2f}"
        print(f"{name:24s} {summary.rougeL:7.2f} {summary.rep4 or 0.0:6.2f} {summary.speedup:7.2f}x {summary.exact_match:6.2f} "
              f"{per_pass:>8s} {summary.small_time_s or 0.0:8.1f} {summary.large_time_s or 0.0:8.1f}")
