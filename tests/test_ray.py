"""bild on Ray: Ray Serve replicas behind the OpenAI API, on a local Ray started here (tiny seeded models, loopback)."""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

pytest.importorskip("ray", reason="bild[ray] is not installed")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from bild.cli.serve import PROXY_READY_ENV  # noqa: E402

# the fixture's local Ray (started here, not by `bild serve`) gives its HTTP proxy as long as `bild serve` does
os.environ.setdefault(PROXY_READY_ENV, "30")

from bild.config import BiLDConfig, DraftCosts  # noqa: E402
from bild.serve.ray import DEPLOYMENT_NAME, REPLICA_HEADER, ReplicaSpec, Scaling, build_app  # noqa: E402
from conftest import TEST_COSTS, make_pair  # noqa: E402

MODEL = "tiny"
# what every replica plans with: drafts as good as free, so the replicas draft wherever they can, unlike what timing
# the tiny pair (two models of about the same cost) would make them do
FREE_DRAFTS = DraftCosts(small_step=0.001, large_base=1.0, large_per_token=0.0)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def save_pair(root, with_eos: bool) -> tuple[str, str]:
    """The conftest Llama pair written as two model directories (what a replica loads by path)."""
    pair = make_pair("llama", with_eos=with_eos)
    pair.large.tokenizer.chat_template = CHAT_TEMPLATE
    paths = []
    for loaded, name in ((pair.large, "large"), (pair.small, "small")):
        path = root / name
        loaded.model.save_pretrained(path)
        pair.large.tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs first, before the module's own Ray starts, so the processes it counts are only its own.
def test_cli_serves_on_a_local_ray_and_leaves_no_ray_process_after_sigterm(tmp_path):
    large, small = save_pair(tmp_path, with_eos=True)
    port = free_port()
    command = [sys.executable, "-m", "bild", "serve", "--ray", "--replicas", "1", "--num-cpus", "0.5", "--threads", "1",
               "--large", large, "--small", small, "--model-name", MODEL, "--port", str(port), "--max-new-tokens", "8"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    descendants: list[psutil.Process] = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _healthy(url):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "bild serve --ray did not come up"
            time.sleep(0.5)
        answer = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "w5 w6", "max_tokens": 4}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        descendants = psutil.Process(process.pid).children(recursive=True)
        assert descendants  # the local Ray's own processes (GCS, raylet, workers)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stderr.read()
        _, alive = psutil.wait_procs(descendants, timeout=30)
        assert not alive, alive
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_proxy_that_does_not_start_is_one_line_and_ray_is_stopped(monkeypatch, capsys):
    """On a busy machine Ray Serve may kill an HTTP proxy that misses its health checks: one line, exit 2."""
    from bild.cli import main

    calls = []

    def proxy_died(**_options):
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own handlers
    monkeypatch.setattr(ray, "init", lambda **_: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(serve, "start", proxy_died)
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    assert main(["serve", "--ray", "--large", "some-large", "--small", "some-small"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("bild serve: error: Ray Serve's HTTP proxy did not start:"), error
    assert calls == ["init", "serve.shutdown", "shutdown"]


def test_ray_data_answers_twenty_prompts_as_the_local_run_does(tmp_path, capsys):
    """Runs before the module's Serve cluster starts: the command starts (and stops) a local Ray of its own."""
    from bild.cli import main

    large, small = save_pair(tmp_path, with_eos=True)
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"id": f"q{index}", "prompt": f"w{5 + index} w{9 + index % 7} w12"} for index in range(19)]
    lines.append({"prompt": "w5 w6", "rollback_threshold": 0, "max_new_tokens": 6})  # per-line settings, id = line 20
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    # the adaptive policy, lossy, with the costs fixed in a settings file: the workers plan with them, as the local
    # engine does (conftest's costs), so the same choices give the same text and statistics
    settings = tmp_path / "bild.json"
    settings.write_text(json.dumps({"costs": TEST_COSTS.as_dict()}))
    common = ["generate", "--large", large, "--small", small, "--no-chat", "--no-progress", "--max-new-tokens", "10",
              "--threads", "1", "--config", str(settings), "--input", str(prompts)]
    local, distributed = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main([*common, "--output", str(local)]) == 0
    assert main([*common, "--output", str(distributed), "--ray", "--workers", "2"]) == 0
    by_id = {path: {json.dumps(row["id"]): row for row in map(json.loads, path.read_text().splitlines())}
             for path in (local, distributed)}
    assert len(by_id[local]) == 20 and by_id[local].keys() == by_id[distributed].keys()
    for key, row in by_id[local].items():
        other = by_id[distributed][key]
        assert other["token_ids"] == row["token_ids"] and other["text"] == row["text"]  # greedy: token for token
        assert other.keys() == row.keys() and other["stats"].keys() == row["stats"].keys()
        timing = ("small_time_s", "large_time_s", "wall_time_s")
        assert {k: v for k, v in other["stats"].items() if k not in timing} == \
               {k: v for k, v in row["stats"].items() if k not in timing}
    assert main([*common, "--output", str(distributed), "--ray", "--workers", "2"]) == 0  # resumes: nothing left
    assert "already answered" in capsys.readouterr().out
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), with_eos=False)  # no EOS: every answer runs to max_tokens


@pytest.fixture(scope="module")
def ray_url(pair_dirs):
    """Two replicas of the tiny pair on a local Ray (2 CPUs, half a CPU each); Ray is shut down after the module."""
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        spec = ReplicaSpec(large=pair_dirs[0], small=pair_dirs[1], model_name=MODEL, queue_size=2, threads=1,
                           defaults=BiLDConfig(max_new_tokens=12), costs=FREE_DRAFTS)
        serve.run(build_app(spec, Scaling(replicas=2, num_cpus=0.5, max_queued=12, retry_after_s=1)),
                  name=DEPLOYMENT_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(ray_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=ray_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_stream_and_bad_request_through_the_official_client(client):
    messages = [{"role": "user", "content": "w5 w6 w7"}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=10)
    plain = raw.parse()
    assert raw.headers[REPLICA_HEADER]  # every answer names its replica
    stats = plain.model_extra["bild"]["stats"]
    assert plain.usage.completion_tokens == 10
    assert stats["small_tokens_kept"] + stats["large_tokens"] == plain.usage.completion_tokens
    # lossy and adaptive, yet the same text from every replica: they plan with the spec's costs, not their own clock
    chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == plain.choices[0].message.content

    def ask(_) -> tuple[str, str]:
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=10)
        return raw.headers[REPLICA_HEADER], raw.parse().choices[0].message.content

    with ThreadPoolExecutor(4) as pool:  # at once, so that both replicas answer
        answers = set(pool.map(ask, range(8)))
    assert len({replica for replica, _ in answers}) == 2 and {text for _, text in answers} == {streamed}, answers
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="w5 w6", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="w5 w6", max_tokens=4)


def test_both_replicas_serve_under_concurrent_load(ray_url):
    def one(index: int) -> tuple[int, str | None]:
        body = {"model": MODEL, "prompt": f"w{5 + index % 20} w9", "max_tokens": 48}
        response = httpx.post(ray_url + "/v1/completions", json=body, timeout=120)
        return response.status_code, response.headers.get(REPLICA_HEADER)

    # 4 clients at once, each request long enough that a replica is still busy when the next one arrives: Ray's
    # router sends it to the less loaded replica (2 replicas x (1 running + 2 waiting) hold them all, so no 429)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(24)))
    assert all(status == 200 for status, _ in answers), collections.Counter(answers)
    assert len({replica for _, replica in answers}) == 2, collections.Counter(answers)


def test_requests_beyond_the_replicas_queues_wait_in_rays_queue_not_refused(ray_url):
    """2 replicas x (1 generating + 2 queued) = 6 in the replicas; 12 at once: 6 wait in Ray's queue (12 places:
    Ray counts a burst in its queue in full until it has handed requests to replicas, so 8 places refused some)."""

    def one(index: int) -> int:
        body = {"model": MODEL, "prompt": f"w{5 + index} w9", "max_tokens": 40}
        return httpx.post(ray_url + "/v1/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(12) as pool:
        statuses = collections.Counter(pool.map(one, range(12)))
    assert statuses == {200: 12}, statuses


def test_overload_is_429_with_retry_after_never_5xx(ray_url):
    """2 replicas x (1 generating + 2 queued) + 12 held by Ray: 40 long requests must overflow."""

    def one(index: int) -> httpx.Response:
        body = {"model": MODEL, "prompt": "w5 w6", "max_tokens": 300}
        return httpx.post(ray_url + "/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(one, range(40)))
    statuses = collections.Counter(response.status_code for response in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[429] >= 1 and statuses[200] >= 2, statuses
    refused = [response for response in responses if response.status_code == 429]
    assert all(int(response.headers["retry-after"]) >= 1 for response in refused)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
