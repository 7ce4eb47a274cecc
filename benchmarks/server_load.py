"""How does `bild serve` hold up under concurrent clients, on one engine or on Ray Serve replicas?

Starts `bild serve` (one generation worker, a bounded queue) on loopback, sends one untimed warm-up request, then
for each concurrency level C runs C clients that send chat completions back to back (greedy, the server's BiLD
defaults) until --requests have been answered or refused. Per level: answered requests/s, generated tokens/s, p50 and
p95 latency of answered requests, and how many were refused with 429 (queue full: C above the queue size plus the one
generating). Figures are medians over --repeats with min/max.

With --ray-replicas 1,2 each server is `bild serve --ray --replicas R --num-cpus 1` on a local Ray instead, one
engine of --threads threads per replica; every repeat starts each server afresh, in turn, so the replica counts are
measured side by side under the same machine load.

    python benchmarks/server_load.py --concurrency 1,4,16 --requests 16 --repeats 3 --threads 2
    python benchmarks/server_load.py --ray-replicas 1,2 --concurrency 16 --requests 32 --repeats 3 --threads 1
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    REPO, BenchmarkError, add_docsum_arguments, base_parser, check_arguments, load_dataset, main_guard, provenance,
    result_path, run_repeats, settings_of, spread, write_result,
)

QUESTION = "server-load"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int, log: Path, replicas: int | None = None) -> subprocess.Popen:
    """`python -m bild serve` from this tree (on a local Ray with ``replicas`` replicas if given), waiting until
    /health answers; its output goes to ``log``."""
    import httpx

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "bild", "serve", "--large", args.large, "--small", args.small,
               "--port", str(port), "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens),
               "--queue-size", str(args.queue_size), "--log-level", "warning"]
    if replicas is not None:
        command += ["--ray", "--replicas", str(replicas), "--num-cpus", "1"]
    with log.open("w") as output:  # the child keeps its own copy of the file descriptor
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text()[-2000:].strip().splitlines()[-1:] or ["(no output)"]
            raise BenchmarkError(f"bild serve exited with code {server.returncode}: {tail[0]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_server(server)
    raise BenchmarkError(f"bild serve did not answer /health within {args.startup_timeout:g} s (log: {log})")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM and wait: `bild serve --ray` stops its local Ray before it exits."""
    server.terminate()
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


async def load_level(url: str, model: str, prompts: list[str], clients: int, requests: int, max_tokens: int,
                     chat: bool) -> dict:
    """``clients`` concurrent clients sending ``requests`` requests in all; the level's raw figures."""
    import httpx

    todo = list(range(requests))
    latencies, tokens, refused, failed = [], 0, 0, 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, refused, failed
        while todo:
            prompt = prompts[todo.pop() % len(prompts)]
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
            body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/{'chat/completions' if chat else 'completions'}", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
                tokens += response.json()["usage"]["completion_tokens"]
            elif response.status_code == 429:
                refused += 1
            else:
                failed += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "answered": len(latencies), "refused_429": refused, "failed": failed,
            "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_latency_s": statistics.median(latencies) if latencies else None,
            "p95_latency_s": percentile(latencies, 95) if latencies else None}


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    import httpx

    parser = base_parser(__doc__)
    add_docsum_arguments(parser, limit=16)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=16, help="requests per level and repeat (default: %(default)s)")
    parser.add_argument("--queue-size", type=int, default=8, help="bild serve --queue-size (default: %(default)s)")
    parser.add_argument("--ray-replicas", help="comma-separated replica counts: serve through Ray Serve "
                        "(pip install 'bild[ray]') with each count in turn")
    parser.add_argument("--no-chat", action="store_true", help="plain /v1/completions (for models without a chat template)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for the server (default: %(default)s)")
    args = parser.parse_args(argv)
    check_arguments(args)
    try:
        levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1 or args.requests < 1:
        raise BenchmarkError(f"--concurrency takes client counts >= 1 and --requests a count >= 1, got "
                             f"{args.concurrency!r} and {args.requests}")
    dataset = load_dataset(args)
    prompts = [dataset.prompt(example) for example in dataset.examples]
    stamp = provenance(__file__, argv)
    path = result_path(QUESTION, stamp, args.results_dir)

    try:
        setups = [int(part) for part in args.ray_replicas.split(",")] if args.ray_replicas else [None]
    except ValueError:
        setups = [0]
    if any(replicas is not None and replicas < 1 for replicas in setups):
        raise BenchmarkError(f"--ray-replicas takes replica counts >= 1, got {args.ray_replicas!r}")
    names = {replicas: "local" if replicas is None else f"{replicas} replica{'s' * (replicas > 1)}"
             for replicas in setups}

    def measure(replicas: int | None) -> dict:
        """One server up, a warm-up request, every level, the server down."""
        with tempfile.TemporaryDirectory() as folder:
            port = free_port()
            server = start_server(args, port, Path(folder) / "serve.log", replicas)
            try:
                url = f"http://127.0.0.1:{port}"
                model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]

                def level(clients: int, requests: int) -> dict:
                    return asyncio.run(load_level(url, model, prompts, clients, requests, args.max_new_tokens,
                                                  not args.no_chat))

                for _ in range(replicas or 1):  # warm-up, untimed: one request per replica
                    level(replicas or 1, replicas or 1)
                return {clients: level(clients, args.requests) for clients in levels}
            finally:
                stop_server(server)

    def once(_warmup: int, _progress) -> dict:
        return {names[replicas]: measure(replicas) for replicas in setups}

    runs = run_repeats(once, args.repeats, len(setups), f"{len(setups)} servers x {len(levels)} levels x {args.repeats}")

    keys = ("requests_per_s", "tokens_per_s", "p50_latency_s", "p95_latency_s", "refused_429", "answered", "failed")
    results = {"repeats": len(runs), "requests_per_level": args.requests, "queue_size": args.queue_size,
               "servers": {name: {clients: {key: spread(run[name][clients][key] for run in runs)
                                            if all(run[name][clients][key] is not None for run in runs) else None
                                            for key in keys} for clients in levels} for name in names.values()}}
    print(f"bild serve, {args.requests} requests per level, queue {args.queue_size}, {len(runs)} repeats (medians)")
    for name, rows in results["servers"].items():
        for clients, row in rows.items():
            p50, p95 = row["p50_latency_s"], row["p95_latency_s"]
            print(f"{name:>10}, {clients:3d} clients: {row['requests_per_s']['median']:.2f} req/s, "
                  f"{row['tokens_per_s']['median']:.1f} tok/s, p50 {p50['median'] if p50 else float('nan'):.2f} s, "
                  f"p95 {p95['median'] if p95 else float('nan'):.2f} s, 429: {row['refused_429']['median']:g}")
    write_result(path, QUESTION, stamp, settings_of(args), results)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
