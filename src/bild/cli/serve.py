"""`bild serve`: the default pair (or any --large/--small) behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os
import sys

from bild.cli.common import (
    UsageError,
    add_decoding_arguments,
    add_device_arguments,
    add_model_arguments,
    config_from_args,
    placement_from_args,
    set_threads,
)
from bild.models import DEFAULT_LARGE

API_KEY_ENV = "BILD_API_KEY"

EPILOG = f"""\
examples:
  bild serve                                   # the default pair on http://127.0.0.1:8000/v1
  bild serve --port 8080 --rollback-threshold 2 --max-new-tokens 256
  {API_KEY_ENV}=secret bild serve --host 0.0.0.0   # other hosts: always with an API key

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{DEFAULT_LARGE}", "prompt": "The capital of France is", "max_tokens": 20}}'

Per-request BiLD settings are extra body fields: fallback_threshold, rollback_threshold, max_small_steps,
repeat_ngram.
GET /metrics serves Prometheus metrics; GET /health answers 200 while the generation worker runs.
"""


def register(subparsers) -> argparse.ArgumentParser:

    parser = subparsers.add_parser(
        "serve",
        help="serve a model pair behind the OpenAI API (completions, chat, streaming, metrics)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    add_device_arguments(parser)
    parser.add_argument("--model-name", help="the name clients send as `model` (default: the --large name)")
    http = parser.add_argument_group("http")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    http.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    http.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV})")
    http.add_argument("--queue-size", type=int, default=8, help="requests that may wait while one generates; more get 429 (default: %(default)s)")
    http.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds in-flight requests get to finish on SIGTERM (default: %(default)s)")
    http.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    http.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_decoding_arguments(parser.add_argument_group("server-wide defaults (each request may override them)"))
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from bild.decoding import BiLD
    from bild.models import load_pair
    from bild.serve import create_app

    defaults = config_from_args(args)
    where, small_device = placement_from_args(args)
    if args.queue_size < 0:
        raise UsageError(f"--queue-size must be >= 0, got {args.queue_size}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0-65535, got {args.port}")
    if args.small is None or args.small.lower() == "none":
        raise UsageError("bild serve needs a small model (--small): it streams text the large model has checked")
    set_threads(args.threads)
    print(f"loading {args.large} + {args.small} ...", file=sys.stderr)
    try:
        pair = load_pair(args.large, args.small, where=where, small_device=small_device)
    except ValueError as error:  # ModelLoadError, VocabularyMismatchError
        raise UsageError(str(error)) from error
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without an API key (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    model_name = args.model_name or args.large
    app = create_app(BiLD(pair), model_name, defaults, queue_size=args.queue_size, api_key=args.api_key)
    print(f"serving {model_name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM stops)", file=sys.stderr)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout
    )
    return 0
