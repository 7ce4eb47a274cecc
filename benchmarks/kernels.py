"""What do bild's CPU kernels (bild.cpu) buy? The large model's verification passes with them on and off.

bild switches the large model's linear layers to a packed oneDNN kernel for 1-64 rows and its grouped-query attention
to ``enable_gqa`` SDPA (``BiLD(pair, cpu_kernels=True)``, the default); "off" is PyTorch's and transformers' own
path. Two measurements in one run:
1. one large pass over k = 1..11 new tokens after a 150-token cached prefix, both arms interleaved in every round
   (each round a repeat), in units of a one-token step with the kernels off;
2. BiLD on docsum at the paper's thresholds and in lossless mode with the kernels on and off, and transformers'
   generate with the kernels on, interleaved per example with vanilla (transformers' generate, kernels off) after a
   warm-up, --repeats times.

    python benchmarks/kernels.py --limit 20 --repeats 3 --threads 2
"""

from __future__ import annotations

import copy
import sys
import time

from common import MIN_REPEATS, BenchmarkError, add_docsum_arguments, base_parser, check_arguments, main_guard, run_harness, spread

QUESTION = "kernels"
WIDTHS = range(1, 12)  # a pass verifies up to N = 10 drafts plus the token before them


def set_arm(model, on: bool) -> None:
    """Switch the large model's kernels (in place; the weights stay the same tensors)."""
    import torch

    from bild.cpu import CPU_ATTENTION, SmallBatchLinear

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.__class__ = SmallBatchLinear if on else torch.nn.Linear
    model.set_attn_implementation(CPU_ATTENTION if on else "sdpa")


def pass_ms(model, rounds: int, prefix_len: int = 150) -> dict[str, dict[int, list[float]]]:
    """ms of one cached pass over k tokens, per arm and k: one value per round, arms and widths interleaved, after
    an untimed round (which also lets the packed kernels pack their weights)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prefix_len + max(WIDTHS)), generator=generator)
    with torch.inference_mode():
        prefix_cache = model(ids[:, :prefix_len], use_cache=True).cache
    times = {arm: {width: [] for width in WIDTHS} for arm in ("off", "on")}
    for round_index in range(rounds + 1):
        for arm in times:
            set_arm(model, arm == "on")
            for width in WIDTHS:
                cache = copy.deepcopy(prefix_cache)
                started = time.perf_counter()
                with torch.inference_mode():
                    model(ids[:, prefix_len: prefix_len + width], cache=cache, use_cache=True, logits_to_keep=width)
                if round_index:
                    times[arm][width].append((time.perf_counter() - started) * 1000)
    set_arm(model, True)
    return times


def with_arm(method, model, on: bool):
    def call(request):
        set_arm(model, on)
        return method(request)

    return call


def main(argv: list[str] | None = None) -> int:
    from bild.config import BiLDConfig
    from bild.eval.methods import bild_method, build_method

    parser = base_parser(__doc__)
    add_docsum_arguments(parser)
    parser.add_argument("--pass-rounds", type=int, default=9, help="rounds of the pass timing, at least 3 (default: %(default)s)")
    args = parser.parse_args(argv)
    check_arguments(args)
    if args.pass_rounds < MIN_REPEATS:
        raise BenchmarkError(f"--pass-rounds must be >= {MIN_REPEATS}, got {args.pass_rounds}")
    config = BiLDConfig(max_new_tokens=args.max_new_tokens)

    def build(context) -> dict:
        model = context.pair.large.model
        vanilla = build_method("vanilla", context)
        methods = {"vanilla": with_arm(vanilla, model, False), "vanilla kernels on": with_arm(vanilla, model, True)}
        for label, rollback in (("bild", 5.0), ("bild-lossless", 0.0)):
            method = bild_method(context, rollback_threshold=rollback)
            methods[f"{label} kernels off"] = with_arm(method, model, False)
            methods[f"{label} kernels on"] = with_arm(method, model, True)
        return methods

    def measure_passes(context, _dataset) -> dict:
        times = pass_ms(context.pair.large.model, args.pass_rounds)
        one_token = spread(times["off"][1])["median"]
        return {"large_pass": {
            "one_token_ms_kernels_off": one_token,
            "prefix_tokens": 150,
            "rounds": args.pass_rounds,
            "ms": {arm: {width: spread(values) for width, values in by_width.items()} for arm, by_width in times.items()},
            "relative_to_one_token": {arm: {width: spread(ms / one_token for ms in values)
                                            for width, values in by_width.items()} for arm, by_width in times.items()},
        }}

    return run_harness(QUESTION, __file__, args, argv, config, build, before=measure_passes)


if __name__ == "__main__":
    sys.exit(main_guard(main))
