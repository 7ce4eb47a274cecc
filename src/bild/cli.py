"""The `bild` command: argparse subcommands. The only place (with the cli_* modules) that prints."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time

from bild.config import BiLDConfig, GenerationResult, SamplingConfig

# Subcommand modules; each exposes register(subparsers).
_SUBCOMMAND_MODULES = ["bild.cli_align", "bild.cli_eval", "bild.cli_serve", "bild.cli_early_exit"]

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


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser, small_default: str | None = "smollm2-little") -> None:
    from bild.models import DEFAULT_LARGE

    parser.add_argument("--large", default=DEFAULT_LARGE, help="large model: a name, local directory or HF id (default: %(default)s)")
    parser.add_argument("--small", default=small_default, help="small model: a name, local directory or HF id (default: %(default)s)")
    parser.add_argument("--early-exit-layer", type=int, metavar="K",
                        help="draft with the large model's own first K layers (same as --small early-exit:K)")


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BiLDConfig()
    parser.add_argument("--fallback-threshold", type=float, default=defaults.fallback_threshold, help="alpha_FB in [0, 1] (default: %(default)s)")
    parser.add_argument("--rollback-threshold", type=float, default=defaults.rollback_threshold, help="alpha_RB >= 0; 0 = exactly the large model's greedy output, inf = never (default: %(default)s)")
    parser.add_argument("--max-small-steps", type=int, default=defaults.max_small_steps, help="N: most small tokens in a row (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="(default: %(default)s)")
    parser.add_argument("--repeat-ngram", type=int, default=defaults.repeat_ngram, metavar="N",
                        help="repetition guard (not in the paper): a small token that repeats a token N-gram of the "
                             "output is checked as if alpha_RB were 0; 0 = off (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def config_from_args(args: argparse.Namespace) -> BiLDConfig:
    """Build the validated config; a ValueError becomes a one-line usage error."""
    try:
        sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        return BiLDConfig(
            fallback_threshold=args.fallback_threshold,
            rollback_threshold=args.rollback_threshold,
            max_small_steps=args.max_small_steps,
            max_new_tokens=args.max_new_tokens,
            repeat_ngram=args.repeat_ngram,
            sampling=sampling,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error


def load_engine(large: str, small: str | None):
    """Load the pair (errors -> UsageError). Without the default little model, run the large model alone."""
    from bild.decoding import BiLD
    from bild.models import DEFAULT_SMALL, ModelLoadError, ModelPair, check_same_vocabulary, load_model

    try:
        large_model = load_model(large)
        small_model = None
        if small is not None:
            try:
                small_model = load_model(small, large=large_model)
            except ModelLoadError as error:
                if small != DEFAULT_SMALL:
                    raise
                print(f"note: {error}; running the large model alone", file=sys.stderr)
        if small_model is not None:
            check_same_vocabulary(large_model, small_model)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return BiLD(ModelPair(large=large_model, small=small_model))


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
            f"tokens in {vanilla.stats.wall_time_s:.2f} s (same run): {vanilla.stats.wall_time_s / result.stats.wall_time_s:.2f}x "
            f"faster per request, {_result_speedup_per_token(result, vanilla):.2f}x per token; "
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
              f"sum of vanilla times / sum of BiLD times = {total_vanilla / total_bild:.2f}x; per token {per_token:.2f}x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bild", description="Big Little Decoder: a small model writes, a large model checks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)

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

    for module_name in _SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "early_exit_layer", None) is not None:  # one spelling for every subcommand with --small
        args.small = f"early-exit:{args.early_exit_layer}"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # transformers' weight-loading bars and advisories are noise on a command line
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        return args.func(args) or 0
    except UsageError as error:
        print(f"bild {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
