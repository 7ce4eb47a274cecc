"""`bild generate` (one prompt, or a file of them) and `bild demo` (built-in prompts, BiLD beside the large model
alone)."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from bild.cli.common import (
    UsageError,
    add_config_argument,
    add_decoding_arguments,
    add_device_arguments,
    add_model_arguments,
    config_from_args,
    load_engine,
    placement_from_args,
    set_threads,
)
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
  bild generate --device cuda --dtype bfloat16 --rollback-threshold 0 "What is 2+2?"
  bild generate --input prompts.jsonl --output answers.jsonl --max-new-tokens 64

files of prompts (--input): one JSON object a line with "prompt" (or chat "messages"), an optional "id" (default:
the line number) and optional settings for that line (fallback_threshold, rollback_threshold, max_small_steps,
max_new_tokens, repeat_ngram, temperature, top_p, seed, chat). Answers are appended to --output as they finish;
run the same command again after an interrupt and it answers only the ids not yet in --output.
"""


def _cmd_generate(args: argparse.Namespace) -> int | None:
    config = config_from_args(args)
    where, small_device = placement_from_args(args)
    set_threads(args.threads)
    if args.ray and args.input is None:
        raise UsageError("--ray answers a file of prompts: give --input FILE and --output FILE")
    if args.input is not None:
        return _cmd_generate_file(args, config, where, small_device)
    if args.output is not None:
        raise UsageError("--output goes with --input (a file of prompts); one prompt prints to stdout")
    if args.prompt is None:
        raise UsageError("give a prompt, or --input FILE with one prompt a line")
    if not args.prompt.strip():
        raise UsageError("prompt is empty")
    engine = load_engine(args.large, args.small, where, small_device, costs=args.costs)
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


def _cmd_generate_file(args: argparse.Namespace, config: BiLDConfig, where, small_device) -> int:
    """--input/--output: check every line, skip the ids already answered, answer the rest with a progress bar."""
    from bild.batch import AnswerWriter, PromptFileError, answer_all, answered_ids, encode_all, pending, read_prompts

    if args.prompt is not None:
        raise UsageError("give either a prompt or --input, not both")
    if args.output is None:
        raise UsageError("--input needs --output FILE (answers are appended there, and a rerun resumes from it)")
    for flag in ("stream", "compare", "json"):
        if getattr(args, flag):
            raise UsageError(f"--{flag} is for one prompt; with --input every answer goes to --output as JSON")
    if args.output.is_dir() or not args.output.parent.is_dir():
        raise UsageError(f"--output {args.output}: must be a file in an existing directory")
    if args.output.exists() and args.input.exists() and args.output.samefile(args.input):
        raise UsageError("--output must not be the --input file")
    try:
        records = read_prompts(args.input, config)
        done, _ = answered_ids(args.output)
    except PromptFileError as error:
        raise UsageError(str(error)) from error
    todo = pending(records, done)
    skipped = len(records) - len(todo)
    if not todo:
        print(f"all {len(records)} prompts of {args.input} are already answered in {args.output}")
        return 0
    if args.ray:
        answers = _ray_answers(args, todo, config)
    else:
        engine = load_engine(args.large, args.small, where, small_device, costs=args.costs)
        try:
            prompt_ids = encode_all(engine, todo, str(args.input), args.chat)
        except PromptFileError as error:
            raise UsageError(str(error)) from error
        answers = partial(answer_all, engine, todo, prompt_ids, config)
    bar = _file_progress(args, len(todo), skipped)
    interrupted = False
    with AnswerWriter(args.output) as writer:
        if writer.dropped_bytes:
            print(f"note: dropped a torn last line ({writer.dropped_bytes} bytes) of {args.output}; "
                  "its prompt is answered again", file=sys.stderr)
        totals = None
        try:
            for totals in answers(writer):
                if bar is not None:
                    bar.set_postfix_str(_rates(totals), refresh=False)
                    bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
    print(_file_summary(totals, skipped, len(records), args.output, interrupted))
    refused = getattr(totals, "refused", None)
    if refused:
        first = min(refused)
        raise UsageError(f"{len(refused)} prompt(s) of {args.input} were refused, not answered; "
                         f"line {first}: {refused[first]}")
    return 130 if interrupted else 0


def _ray_answers(args: argparse.Namespace, todo, config: BiLDConfig):
    """--ray: the pending records on Ray Data, one engine per worker (bild.batch_ray)."""
    from bild.extras import require

    require("ray", "bild generate --ray")
    from bild.batch_ray import EngineSpec, RayRun, answer_on_ray

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    small = None if args.small is not None and args.small.lower() == "none" else args.small
    spec = EngineSpec(large=args.large, small=small, device=args.device, dtype=args.dtype, device_map=args.device_map,
                      small_device=args.small_device, threads=args.threads, chat=args.chat, costs=args.costs)
    run = RayRun(workers=args.workers, num_cpus=float(args.threads or 1), address=args.ray_address)
    return partial(answer_on_ray, todo, spec, config, run=run)


def _file_progress(args: argparse.Namespace, total: int, skipped: int):
    if args.no_progress:
        return None
    from tqdm import tqdm

    label = "answers" + (f" ({skipped} done before)" if skipped else "")
    return tqdm(total=total, desc=label, unit="prompt", file=sys.stderr, dynamic_ncols=True)


def _rates(totals) -> str:
    """tokens/s and the BiLD rates: the share of tokens the small model wrote, fallbacks and rollbacks per token."""
    return (f"{totals.tokens_per_s:.1f} tok/s, small {totals.rate('small_tokens_kept'):.0%}, "
            f"fallback {totals.rate('fallbacks'):.2f}/tok, rollback {totals.rate('rollbacks'):.2f}/tok")


def _file_summary(totals, skipped: int, total: int, output: Path, interrupted: bool) -> str:
    answered = totals.answered if totals is not None else 0
    lines = [f"{answered} answered now, {skipped} before, {total - skipped - answered} left of {total}; in {output}"]
    if totals is not None and totals.answered:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(totals.finish_reasons.items()))
        lines.append(f"{totals.new_tokens} tokens in {totals.wall_time_s:.1f} s: {_rates(totals)} ({reasons})")
    if interrupted:
        lines.append("interrupted: every finished answer is saved; run the same command again to resume")
    return "\n".join(lines)


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
    lookup = f" ({s.lookup_tokens_kept} of them lookup drafts it kept)" if s.lookup_tokens_kept else ""
    return (f"{s.new_tokens} tokens: {s.small_tokens_kept} from the small model, {s.large_tokens} from the large{lookup}; "
            f"{s.large_passes} large passes, {s.fallbacks} fallbacks, {s.rollbacks} rollbacks "
            f"({s.tokens_discarded} tokens discarded)")


def _cmd_demo(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    engine = load_engine(args.large, args.small, *placement_from_args(args))
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
        guard += f", lookup {config.lookup_ngram}" if config.lookup_ngram else ""
        print(f"\noverall, this run, at fallback {config.fallback_threshold}, rollback {config.rollback_threshold}, "
              f"N {config.max_small_steps}{guard}: "
              f"{total_vanilla / total_bild:.2f}x the speed of the large model alone (sum of its times / sum of BiLD's), "
              f"{per_token:.2f}x per token")


def register(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="generate text for one prompt or a file of prompts",
                                     epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate.add_argument("prompt", nargs="?", help="the prompt (a user message for chat models); or use --input")
    generate.add_argument("--input", type=Path, help="a JSONL file of prompts (see below); needs --output")
    generate.add_argument("--output", type=Path, help="JSONL answers, appended as they finish; a rerun resumes")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar with --input")
    generate.add_argument("--ray", action="store_true",
                          help="answer --input on Ray Data, one engine per worker (pip install 'bild[ray]')")
    generate.add_argument("--workers", type=int, default=1, help="Ray Data workers with --ray (default: %(default)s)")
    generate.add_argument("--threads", type=int, help="torch CPU threads (per worker with --ray; default: torch's)")
    generate.add_argument("--ray-address", help="with --ray: join this cluster (default: start a local Ray)")
    add_model_arguments(generate)
    add_device_arguments(generate)
    add_decoding_arguments(generate)
    add_config_argument(generate)
    generate.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                          help="apply the chat template (default: when the large model has one)")
    generate.add_argument("--json", action="store_true", help="print one JSON object with text, token_ids and stats")
    generate.add_argument("--compare", action="store_true", help="also run the vanilla large model and print the speedup")
    generate.add_argument("--stream", action="store_true", help="print text as soon as the large model has checked it")
    generate.set_defaults(func=_cmd_generate)

    demo = subparsers.add_parser("demo", help="BiLD on built-in prompts, with the speedup over the large model alone")
    add_model_arguments(demo)
    add_device_arguments(demo)
    add_decoding_arguments(demo)
    demo.set_defaults(func=_cmd_demo)
