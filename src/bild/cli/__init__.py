"""The `bild` command: argparse subcommands, one module each. The only package that prints."""

from __future__ import annotations

import argparse
import logging
import sys

from bild.cli import align, early_exit, eval, generate, serve, tune
from bild.cli.common import UsageError, apply_settings_file, check_text_arguments, costs_for_pair, unsupported_dtype
from bild.extras import MissingExtraError

# Each subcommand module exposes register(subparsers), in the order `bild --help` lists them.
SUBCOMMANDS = (generate, eval, tune, serve, align, early_exit)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bild", description="Big Little Decoder: a small model writes, a large model checks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    parser.subcommands = subparsers.choices  # name -> its parser, for --config
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings: dict[str, object] = {}
    if getattr(args, "config", None) is not None:  # the file's settings become defaults; parse again: flags win
        try:
            settings = apply_settings_file(parser.subcommands[args.command], args.config)
        except UsageError as error:
            print(f"bild {args.command}: error: {error}", file=sys.stderr)
            return 2
        args = parser.parse_args(argv)
    if getattr(args, "early_exit_layer", None) is not None:  # one spelling for every subcommand with --small
        args.small = f"early-exit:{args.early_exit_layer}"
    costs_for_pair(args, settings)  # the file's costs only for the file's pair
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # transformers' weight-loading bars and advisories are noise on a command line
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    try:
        check_text_arguments(args)
        return args.func(args) or 0
    except (UsageError, MissingExtraError) as error:
        print(f"bild {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # e.g. float16 on a CPU operation that lacks it: one line, not a traceback
        message = unsupported_dtype(error)
        if message is None:
            raise
        print(f"bild {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
