"""`bild serve`: the default pair (or any --large/--small) behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import argparse
import os
import sys

from bild.cli.common import (
    UsageError,
    add_config_argument,
    add_decoding_arguments,
    add_device_arguments,
    add_model_arguments,
    config_from_args,
    placement_from_args,
    set_threads,
)
from bild.models import DEFAULT_LARGE

# the defaults of bild.serve.app, which needs the serve extra to import; tests/test_serve.py checks they agree
DEFAULT_QUEUE_SIZE = 32
DEFAULT_MAX_PROMPT_TOKENS = 2048

API_KEY_ENV = "BILD_API_KEY"
PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"  # seconds Ray Serve waits for its HTTP proxy

EPILOG = f"""\
examples:
  bild serve                                   # the default pair on http://127.0.0.1:8000/v1
  bild serve --port 8080 --rollback-threshold 2 --max-new-tokens 256
  {API_KEY_ENV}=secret bild serve --host 0.0.0.0   # other hosts: always with an API key

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{DEFAULT_LARGE}", "prompt": "The capital of France is", "max_tokens": 20}}'

Per-request BiLD settings are extra body fields: fallback_threshold, rollback_threshold, max_small_steps,
repeat_ngram. Limits: request bodies of 8 MiB, prompts of --max-prompt-tokens, --queue-size waiting requests (more
get 429 with Retry-After); SIGTERM gives requests --shutdown-timeout seconds, then ends them with an error.
GET /metrics serves Prometheus metrics; GET /health answers 200 while the generation worker runs.

on a Ray cluster (pip install 'bild[ray]'; one engine per replica, Ray routes, queues and scales):
  bild serve --ray --replicas 2 --threads 1                 # a local Ray, stopped again on Ctrl-C / SIGTERM
  bild serve --ray --autoscale 1:4 --num-gpus 1 --ray-address auto --host 0.0.0.0 --api-key $KEY
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
    http.add_argument("--queue-size", type=int, default=DEFAULT_QUEUE_SIZE,
                      help="requests that may wait while one generates; more get 429 with Retry-After (default: %(default)s)")
    http.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                      help="longer prompts get 400 (context_length_exceeded): one long prompt holds the only worker, "
                           "~15 s for 2,000 tokens on a busy 2-core CPU (default: %(default)s)")
    http.add_argument("--shutdown-timeout", type=float, default=10.0,
                      help="seconds in-flight requests get to finish on SIGTERM; then a stream ends with an error "
                           "event and a waiting request gets 503 (default: %(default)s)")
    http.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    http.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_decoding_arguments(parser.add_argument_group("server-wide defaults (each request may override them)"))
    add_config_argument(parser)
    ray = parser.add_argument_group("ray serve (pip install 'bild[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve: one engine per replica")
    ray.add_argument("--replicas", type=int, default=1, help="replicas, each with its own pair (default: %(default)s)")
    ray.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas instead of --replicas")
    ray.add_argument("--target-ongoing", type=float, default=2.0,
                     help="autoscaling target of ongoing requests per replica (default: %(default)s)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each replica reserves (default: %(default)s)")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs each replica reserves, e.g. 0.5 (default: %(default)s)")
    ray.add_argument("--max-queued", type=int, default=64,
                     help="requests Ray holds in front of busy replicas; more get 429 (default: %(default)s)")
    ray.add_argument("--ray-address", help="join this cluster (e.g. auto, ray://head:10001); default: start a local Ray")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from bild.decoding import BiLD
    from bild.models import load_pair
    from bild.serve import create_app, run as run_server

    defaults = config_from_args(args)
    where, small_device = placement_from_args(args)
    if args.queue_size < 0:
        raise UsageError(f"--queue-size must be >= 0, got {args.queue_size}")
    if args.max_prompt_tokens < 1:
        raise UsageError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    if not args.shutdown_timeout >= 0:  # also refuses nan
        raise UsageError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0-65535, got {args.port}")
    if args.small is None or args.small.lower() == "none":
        raise UsageError("bild serve needs a small model (--small): it streams text the large model has checked")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: serving on {args.host} without an API key (--api-key or ${API_KEY_ENV})", file=sys.stderr)
    if args.ray:
        return _run_on_ray(args, defaults)
    set_threads(args.threads)
    print(f"loading {args.large} + {args.small} ...", file=sys.stderr)
    try:
        pair = load_pair(args.large, args.small, where=where, small_device=small_device)
    except ValueError as error:  # ModelLoadError, VocabularyMismatchError
        raise UsageError(str(error)) from error
    model_name = args.model_name or args.large
    app = create_app(BiLD(pair, costs=args.costs), model_name, defaults, queue_size=args.queue_size, api_key=args.api_key,
                     max_prompt_tokens=args.max_prompt_tokens)
    print(f"serving {model_name!r} on http://{args.host}:{args.port}/v1 (Ctrl-C or SIGTERM stops)", file=sys.stderr)
    started = run_server(app, args.host, args.port, shutdown_timeout_s=args.shutdown_timeout, log_level=args.log_level)
    return 0 if started else 1  # uvicorn has logged why (e.g. the port is taken)


def _scaling(args: argparse.Namespace):
    from bild.serve.ray import Scaling

    autoscale = None
    if args.autoscale is not None:
        low, colon, high = args.autoscale.partition(":")
        if not colon or not low.strip().isdigit() or not high.strip().isdigit():
            raise UsageError(f"--autoscale takes MIN:MAX replicas, e.g. 1:4; got {args.autoscale!r}")
        autoscale = (int(low), int(high))
    try:
        return Scaling(replicas=args.replicas, autoscale=autoscale, target_ongoing=args.target_ongoing,
                       num_cpus=args.num_cpus, num_gpus=args.num_gpus, max_queued=args.max_queued)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _run_on_ray(args: argparse.Namespace, defaults) -> int:
    """Start (or join) Ray, deploy one engine per replica, serve until SIGINT/SIGTERM, then leave nothing behind."""
    import signal
    import threading

    from bild.extras import require

    require("ray", "bild serve --ray")
    from bild.serve.ray import DEPLOYMENT_NAME, ReplicaSpec, build_app

    scaling = _scaling(args)
    spec = ReplicaSpec(large=args.large, small=args.small, model_name=args.model_name, defaults=defaults,
                       queue_size=args.queue_size, api_key=args.api_key, threads=args.threads,
                       max_prompt_tokens=args.max_prompt_tokens, costs=args.costs)
    import ray
    from ray import serve

    local = args.ray_address is None
    if local:  # Ray Serve gives its HTTP proxy 5 s to report ready, too little on a busy machine; yours wins if set
        os.environ.setdefault(PROXY_READY_ENV, "30")
    print("starting a local Ray" if local else f"joining the Ray cluster at {args.ray_address}", file=sys.stderr)
    ray.init(address="local" if local else args.ray_address, include_dashboard=False, logging_level="WARNING",
             log_to_driver=args.log_level in ("info", "debug"))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        try:
            serve.start(http_options={"host": args.host, "port": args.port})
        except Exception as error:  # noqa: BLE001 -- e.g. a proxy that missed its health checks on a busy machine
            raise UsageError(f"Ray Serve's HTTP proxy did not start: {_last_line(error)}") from error
        replicas = args.autoscale or args.replicas
        print(f"deploying {replicas} replica(s) of {args.large} + {args.small} ...", file=sys.stderr)
        try:
            serve.run(build_app(spec, scaling), name=DEPLOYMENT_NAME, route_prefix="/")
        except Exception as error:  # noqa: BLE001 -- a replica failed to start: Ray wraps the cause in its own types
            raise UsageError(f"the deployment failed: {_last_line(error)}") from error
        model_name = args.model_name or args.large
        print(f"serving {model_name!r} on http://{args.host}:{args.port}/v1 through Ray Serve "
              "(Ctrl-C or SIGTERM stops)", file=sys.stderr)
        stop.wait()
        print("stopping ...", file=sys.stderr)
    finally:
        if local:
            serve.shutdown()
        else:  # a shared cluster: take our application away, leave the rest running
            serve.delete(DEPLOYMENT_NAME)
        ray.shutdown()
    return 0


def _last_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__
