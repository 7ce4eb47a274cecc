"""`bild generate` (one prompt) and `bild demo` (built-in prompts, BiLD beside the large model alone)."""

from __future__ import annotations

import argparse
import json
import sys

from bild.cli.common import UsageError, add_decoding_arguments, add_model_arguments, config_from_args, load_engine
from bild.config import BiLDConfig, GenerationResult

DEMO_PROMPTS = [
    "Explain photosynthesis in two sentences.",
    "Summarize in one sentence: The Python standard library is very extensive, offering a wide range of "
    "facilities. It contains built-in modules that provide access to system functionality such as file I/O, "
    "as well as modules written in Python that provide standardized solutions for many everyday problems.",
    "What is a hash table used for?",
    "Rewrite more simply: The meeting has been postponed until further notice due to unforeseen circumstances.",
]

GENERATE_EPILOG = """examples:
  bild generate "Explain photosynthesis."
  bild generate --compare "Explain photosynthesis."
  bild generate --stream --max-new-tokens 64 "Write a haiku about rain."
  bild generate --json --fallback-threshold 0.5 --rollback-threshold 0 "What is 2+2?"
  bild generate --temperature 0.8 --top-p 0.9 --seed 1 "Tell me a story."
  bild generate --large ./my-large --small ./my-small --no-chat "translate English to German: Hello"
"""


def _cmd_generate(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    if not args.prompt.strip():
        raise UsageError("prompt is empty")
    engine = load_engine(args.large, args.small)
    chat = args.chat
    try:
        prompt_ids = engine.encode(args.prompt, chat)
    except ValueError as error:
        raise UsageError(str(error)) from error
    bild_available = engine.pair.small is not None
    if args.stream:
        result = _print_stream((engine.stream_ids if bild_available else engine.stream_vanilla_ids)(prompt_ids, config))
    else:
        result = (engine.generate_ids if bild_available else engine.vanilla_ids)(prompt_ids, config)
    vanilla = engine.vanilla_ids(prompt_ids, config) if args.compare else None
    if args.json:
        payload = {"text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
                   "stats": result.stats.as_dict(), "method": "bild" if bild_available else "vanilla"}
        if vanilla is not None:
            payload["vanilla"] = {"text": vanilla.text, "token_ids": vanilla.token_ids, "stats": vanilla.stats.as_dict(),
                                  "speedup": vanilla.stats.wall_time_s / result.stats.wall_time_s,
                                  "speedup_per_token": _result_speedup_per_token(result, vanilla)}
        print(json.dumps(payload, indent=2))
        return
    if not args.stream:
        print(result.text)
    if vanilla is not None:
        print("\n--- vanilla (large model alone) ---")
        print(vanilla.text)
        print(f"\n{_summary(result)}")
        print(_speed_line(result, vanilla))


def _per_token_speedup(bild_s: float, bild_tokens: int, vanilla_s: float, vanilla_tokens: int) -> float:
    """Vanilla seconds per token / BiLD seconds per token: fair when the two texts differ in length."""
    return (vanilla_s / max(vanilla_tokens, 1)) / (bild_s / max(bild_tokens, 1))


def _result_speedup_per_token(result: GenerationResult, vanilla: GenerationResult) -> float:
    return _per_token_speedup(result.stats.wall_time_s, result.stats.new_tokens,
                              vanilla.stats.wall_time_s, vanilla.stats.new_tokens)


def _speed_line(result: GenerationResult, vanilla: GenerationResult) -> str:
    return (f"BiLD {result.stats.new_tokens} tokens in {result.stats.wall_time_s:.2f} s, vanilla {vanilla.stats.new_tokens} "
            f"tokens in {vanilla.stats.wall_time_s:.2f} s (same run): "
            f"{vanilla.stats.wall_time_s / result.stats.wall_time_s:.2f}x the speed of the large model alone per request, "
            f"{_result_speedup_per_token(result, vanilla):.2f}x per token; "
            f"same text as vanilla: {result.token_ids == vanilla.token_ids}")


def _print_stream(chunks) -> GenerationResult:
    result = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        result = chunk.result or result
    sys.stdout.write("\n")
    return result


def _summary(result: GenerationResult) -> str:
    s = result.stats
    return (f"{s.new_tokens} tokens: {s.small_tokens_kept} from the small model, {s.large_tokens} from the large; "
            f"{s.large_passes} large passes, {s.fallbacks} fallbacks, {s.rollbacks} rollbacks "
            f"({s.tokens_discarded} tokens discarded)")


def _cmd_demo(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    engine = load_engine(args.large, args.small)
    if engine.pair.small is None:
        print("(no small model: showing the large model alone)")
    prompts = [engine.encode(prompt) for prompt in DEMO_PROMPTS]
    warm = BiLDConfig(max_new_tokens=8)
    engine.vanilla_ids(prompts[0], warm)  # warm-up, excluded from the timings
    if engine.pair.small is not None:
        engine.generate_ids(prompts[0], warm)
    total_bild = total_vanilla = 0.0
    tokens_bild = tokens_vanilla = 0
    for prompt, ids in zip(DEMO_PROMPTS, prompts):
        print(f"\n>>> {prompt}")
        vanilla = engine.vanilla_ids(ids, config)
        if engine.pair.small is None:
            print(vanilla.text)
            print(f"[{vanilla.stats.new_tokens} tokens in {vanilla.stats.wall_time_s:.2f} s]")
            continue
        result = engine.generate_ids(ids, config)
        total_bild += result.stats.wall_time_s
        total_vanilla += vanilla.stats.wall_time_s
        tokens_bild += result.stats.new_tokens
        tokens_vanilla += vanilla.stats.new_tokens
        print(result.text)
        print(f"[{_summary(result)}]")
        print(f"[{_speed_line(result, vanilla)}]")
    if total_bild:
        per_token = _per_token_speedup(total_bild, tokens_bild, total_vanilla, tokens_vanilla)
        guard = f", repeat guard {config.repeat_ngram}" if config.repeat_ngram else ""
        print(f"\noverall, this run, at fallback {config.fallback_threshold}, rollback {config.rollback_threshold}, "
              f"N {config.max_small_steps}{guard}: "
              f"{total_vanilla / total_bild:.2f}x the speed of the large model alone (sum of its times / sum of BiLD's), "
              f"{per_token:.2f}x per token")


def register(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="generate text for one prompt", epilog=GENERATE_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("prompt", help="the prompt (a user message for chat models)")
    add_model_arguments(generate)
    add_decoding_arguments(generate)
    generate.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                          help="apply the chat template (default: when the large model has one)")
    generate.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    generate.add_argument("--compare", action="store_true", help="also run the vanilla large model and print the speedup")
    generate.add_argument("--stream", action="store_true", help="print text as soon as the large model has checked it")
    generate.set_defaults(func=_cmd_generate)

    demo = subparsers.add_parser("demo", help="BiLD on built-in prompts, with the speedup over the large model alone")
    add_model_arguments(demo)
    add_decoding_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
