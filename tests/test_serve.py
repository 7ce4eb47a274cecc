"""`bild serve` end to end: a real uvicorn server on 127.0.0.1 in a thread, tiny seeded models, the official client."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bild
from bild.config import BiLDConfig, SamplingConfig
from bild.decoding import BiLD
from bild.serve import create_app
from bild.serve.worker import StopScanner
from conftest import make_pair

MODEL = "tiny"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
PROMPT = "w5 w6 w7 w8"
DEFAULTS = BiLDConfig(max_new_tokens=12)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run ~50x faster on one thread than fighting over two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_chat_engine() -> BiLD:
    """The conftest Llama pair, with EOS and a (trivial) chat template so chat completions work."""
    pair = make_pair("llama", with_eos=True)
    pair.large.tokenizer.chat_template = CHAT_TEMPLATE
    return BiLD(
        dataclasses.replace(
            pair, large=dataclasses.replace(pair.large, is_chat=True), small=dataclasses.replace(pair.small, is_chat=True)
        )
    )


class SlowEngine:
    """A real engine whose chunks arrive `delay_s` apart; records whether the generation was closed early."""

    def __init__(self, engine: BiLD, delay_s: float) -> None:
        self.engine, self.pair, self.tokenizer, self.delay_s = engine, engine.pair, engine.tokenizer, delay_s
        self.closed = threading.Event()
        self.chunks_sent = 0

    def encode(self, prompt, chat=None):
        return self.engine.encode(prompt, chat)

    def stream(self, prompt, config, chat=None):
        inner = self.engine.stream(prompt, config, chat=chat)

        def chunks():
            try:
                for chunk in inner:
                    time.sleep(self.delay_s)
                    self.chunks_sent += 1
                    yield chunk
            finally:
                inner.close()
                self.closed.set()

        return chunks()


class Server:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app) -> None:
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=30, **kwargs)


@pytest.fixture(scope="module")
def engine() -> BiLD:
    return tiny_chat_engine()


@pytest.fixture(scope="module")
def server(engine):
    with Server(create_app(engine, MODEL, DEFAULTS, queue_size=4)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def config(**changes) -> BiLDConfig:
    return dataclasses.replace(DEFAULTS, **changes)


# ---- the official client -------------------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_is_the_engines_output_with_stats(client, engine):
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10)
    expected = engine.generate(PROMPT, config(max_new_tokens=10), chat=False)
    choice = response.choices[0]
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens == len(engine.encode(PROMPT, chat=False))
    stats = response.model_extra["bild"]["stats"]
    assert stats["new_tokens"] == len(expected.token_ids)
    assert stats["large_passes"] == expected.stats.large_passes and stats["rollbacks"] == expected.stats.rollbacks


def test_chat_completion_applies_the_chat_template(client, engine):
    messages = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"}]
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    expected = engine.generate(messages, config(max_new_tokens=8), chat=True)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.usage.prompt_tokens == len(engine.encode(messages, chat=True))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}])
def test_streamed_text_equals_the_non_streamed_text(client, sampling):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, **sampling)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stream=True, **sampling))
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].model_extra["bild"]["stats"]["new_tokens"] == plain.usage.completion_tokens

    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, **sampling)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}, **sampling
    ))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_extra_body_bild_settings(server, client, engine):
    """alpha_RB = 0 makes greedy BiLD lossless: the server then returns the large model's own greedy text."""
    extra = {"fallback_threshold": 0.9, "rollback_threshold": 0.0, "max_small_steps": 3, "repeat_ngram": 4}
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, extra_body=extra)
    assert response.model_extra["bild"]["config"] | extra == response.model_extra["bild"]["config"]
    assert response.choices[0].text == engine.vanilla(PROMPT, config(), chat=False).text
    # alpha_RB = inf (never roll back) is JSON's non-standard Infinity, which Python's json module writes and reads
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "rollback_threshold": math.inf})
    never = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert never.json()["bild"]["config"]["rollback_threshold"] == "inf"


def test_stop_string_cuts_text_and_generation(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12).choices[0].text
    words = full.split(" ")
    stop = " " + words[3]
    expected = full[: full.index(stop)]
    response = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stop=[stop, "never-there"])
    assert response.choices[0].text == expected and response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 12
    stats = response.model_extra["bild"]["stats"]  # statistics up to the stop, not null
    assert stats["new_tokens"] == response.usage.completion_tokens and stats["large_passes"] >= 1
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, stop=stop, stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected


def test_errors_are_the_clients_exception_types(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert bad.value.param == "temperature" and bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10**6)
    assert bad.value.param == "max_tokens" and bad.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=" ".join(["w5"] * 600))
    assert bad.value.param == "prompt" and "context is 512 tokens" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"fallback_treshold": 0.5})
    assert bad.value.param == "fallback_treshold" and "unrecognized" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w5"}], extra_body={"rollback_threshold": -1})
    assert bad.value.param == "rollback_threshold"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "w5"}])
    assert bad.value.param == "messages[0].role"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt=PROMPT)
    assert missing.value.param == "model"


def test_api_key(engine):
    with Server(create_app(engine, MODEL, DEFAULTS, queue_size=1, api_key="s3cret")) as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        # the key is checked before the body is read: garbage without a key is 401, not 400
        assert httpx.post(server.url + "/v1/completions", content=b"{nope").status_code == 401
        assert server.client(api_key="s3cret").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices
        assert httpx.get(server.url + "/health").status_code == 200


# ---- queue, disconnects, load --------------------------------------------------------------------------------


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(engine):
    slow = SlowEngine(engine, delay_s=0.05)
    with Server(create_app(slow, MODEL, DEFAULTS, queue_size=0)) as server:
        client = server.client()
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True)
        next(iter(stream))  # the one slot is busy generating
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        busy = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT})
        assert busy.status_code == 429 and int(busy.headers["Retry-After"]) >= 1
        assert busy.json()["error"]["type"] == "rate_limit_error"

        stream.close()  # the client goes away mid-stream
        assert slow.closed.wait(5), "the generation was not stopped"
        assert slow.chunks_sent < 100
        assert _wait_until(lambda: httpx.get(server.url + "/health").json()["queue_depth"] == 0)
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3).choices[0].finish_reason


def test_disconnect_while_waiting_for_a_non_streamed_answer_frees_the_slot(engine):
    slow = SlowEngine(engine, delay_s=0.05)
    with Server(create_app(slow, MODEL, DEFAULTS, queue_size=1)) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 400}, timeout=0.5)
        assert slow.closed.wait(5), "the generation was not stopped"
        assert _wait_until(lambda: httpx.get(server.url + "/health").json()["queue_depth"] == 0)


def _wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_load_every_answer_is_complete_or_an_honest_429(engine):
    """32 concurrent clients x 3 requests against a queue of 4: no answer lost, none garbled, server healthy."""
    prompts = [f"w{5 + i} w{40 + i} w{70 + i}" for i in range(4)]
    expected = {prompt: engine.generate(prompt, config(max_new_tokens=6), chat=False).text for prompt in prompts}
    slow = SlowEngine(engine, delay_s=0.005)
    with Server(create_app(slow, MODEL, DEFAULTS, queue_size=4)) as server:

        def one_client(index: int) -> list[tuple[str, int, str | None]]:
            outcomes = []
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for round_ in range(3):
                    prompt = prompts[(index + round_) % len(prompts)]
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "stream": (index + round_) % 2 == 0}
                    response = http.post("/v1/completions", json=body)
                    outcomes.append((prompt, response.status_code, _answer_text(response, body["stream"])))
            return outcomes

        with ThreadPoolExecutor(32) as pool:
            outcomes = [outcome for client_outcomes in pool.map(one_client, range(32)) for outcome in client_outcomes]

        assert len(outcomes) == 96
        statuses = [status for _, status, _ in outcomes]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 5 and statuses.count(429) >= 1
        for prompt, status, text in outcomes:
            if status == 200:
                assert text == expected[prompt]
        health = httpx.get(server.url + "/health").json()
        assert health["status"] == "ok" and health["queue_depth"] == 0
        metrics = httpx.get(server.url + "/metrics").text
        assert f'bild_requests_total{{route="/v1/completions",status="200"}} {statuses.count(200)}.0' in metrics
        assert f'bild_requests_total{{route="/v1/completions",status="429"}} {statuses.count(429)}.0' in metrics


def _answer_text(response: httpx.Response, stream: bool) -> str | None:
    """The answer's text after checking it is well-formed; None for a well-formed 429."""
    if response.status_code == 429:
        assert int(response.headers["Retry-After"]) >= 1
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        return None
    assert response.status_code == 200, response.text
    if not stream:
        body = response.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["bild"]["stats"]["new_tokens"] >= 1
        return body["choices"][0]["text"]
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "bild" in chunks[-1]
    return "".join(chunk["choices"][0]["text"] for chunk in chunks)


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "bild_requests_total", "bild_generated_tokens_total", "bild_large_passes_total", "bild_fallbacks_total",
        "bild_rollbacks_total", "bild_small_tokens_kept_total", "bild_request_latency_seconds_bucket",
        "bild_time_to_first_token_seconds_bucket",
    ):
        assert name in text, name


# ---- bad input never makes a 5xx -------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
_FIELDS = {
    "model": st.just(MODEL) | _JSON,
    "prompt": st.sampled_from(["w5 w6", "", " ", "héllo \x00 ☃"]) | st.lists(st.text(max_size=5), max_size=2) | _JSON,
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": _JSON | st.just("w5")}),
        max_size=3,
    ) | _JSON,
    "max_tokens": st.integers(-5, 80) | _JSON,
    "temperature": st.floats(-1, 3) | _JSON,
    "top_p": st.floats(-0.5, 1.5) | _JSON,
    "seed": st.integers(-(2**70), 2**70) | _JSON,
    "stop": st.lists(st.text(max_size=3), max_size=5) | st.text(max_size=3) | _JSON,
    "stream": st.booleans() | _JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _JSON,
    "fallback_threshold": st.floats(-1, 2) | _JSON,
    "rollback_threshold": st.floats(-1, math.inf) | _JSON,
    "max_small_steps": st.integers(-3, 2000) | _JSON,
    "repeat_ngram": st.integers(-3, 2000) | _JSON,
    "n": st.integers(0, 3) | _JSON,
}
_BODIES = st.fixed_dictionaries({}, optional=_FIELDS) | st.dictionaries(st.text(max_size=10), _JSON, max_size=4) | _JSON


@pytest.fixture(scope="module")
def fuzz_server(engine):
    """A short context (64 tokens), so whatever max_tokens hypothesis finds, a generation stays quick."""
    with Server(create_app(engine, MODEL, DEFAULTS, queue_size=2, context_length=64)) as running:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            yield http


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_BODIES, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_random_bodies_never_make_a_server_error(fuzz_server, body, path):
    response = fuzz_server.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data"]))
def test_random_bytes_never_make_a_server_error(fuzz_server, raw, content_type):
    response = fuzz_server.post("/v1/completions", content=raw, headers={"Content-Type": content_type})
    assert 400 <= response.status_code < 500 and "error" in response.json()


def test_oversized_body_is_413(fuzz_server):
    body = json.dumps({"model": MODEL, "prompt": "w5 " * 3_000_000})
    response = fuzz_server.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"


@given(text=st.text(alphabet="abc ", max_size=30), cuts=st.lists(st.integers(0, 30), max_size=6), stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=3), max_size=3))
def test_stop_scanner_emits_exactly_the_cut_text(text, cuts, stops):
    scanner = StopScanner(stops)
    bounds = sorted({0, len(text), *[cut for cut in cuts if cut <= len(text)]})
    emitted = ""
    for start, end in zip(bounds, bounds[1:]):
        emitted += scanner.feed(text[start:end])
        if scanner.stopped:
            break
    emitted += scanner.flush()
    assert emitted == scanner.text and text.startswith(emitted)
    assert not any(stop in emitted for stop in stops)
    if scanner.stopped:
        assert any(text[len(emitted):].startswith(stop) for stop in stops)
    else:
        assert emitted == text


# ---- the command line and SIGTERM ------------------------------------------------------------------------------


def test_cli_rejects_bad_settings_before_loading_models(capsys):
    from bild.cli import main

    assert main(["serve", "--rollback-threshold", "-1"]) == 2
    assert "rollback_threshold" in capsys.readouterr().err
    assert main(["serve", "--queue-size", "-1"]) == 2
    assert main(["serve", "--small", "none"]) == 2
    assert "needs a small model" in capsys.readouterr().err


_SIGTERM_SCRIPT = """
import sys, uvicorn, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_serve import SlowEngine, tiny_chat_engine, DEFAULTS
from bild.serve import create_app
app = create_app(SlowEngine(tiny_chat_engine(), 0.05), "tiny", DEFAULTS, queue_size=2)
uvicorn.run(app, host="127.0.0.1", port={port}, log_level="warning", timeout_graceful_shutdown=1)
"""


def test_sigterm_cancels_in_flight_generation_and_exits():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = _SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent), port=port)
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert _wait_until(lambda: _is_up(url), timeout_s=60), "server did not start"
        with httpx.stream("POST", url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True}, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.terminate()  # SIGTERM mid-stream
            started = time.monotonic()
            rest = list(lines)  # the server ends the stream instead of leaving the client hanging
            # uvicorn shuts down gracefully, then re-raises the signal: exit status -SIGTERM, no traceback
            assert process.wait(timeout=20) in (0, -signal.SIGTERM)
            assert time.monotonic() - started < 15
            assert len(rest) < 400
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _is_up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# ---- the real default pair -------------------------------------------------------------------------------------

_LITTLE_WEIGHTS = Path(bild.__file__).parent / "weights" / "aligned.safetensors"  # what `make little` writes


@pytest.mark.slow
@pytest.mark.skipif(not _LITTLE_WEIGHTS.is_file(), reason=f"the little model's weights are not trained yet ({_LITTLE_WEIGHTS} missing)")
def test_default_pair_chat_streaming():
    from bild.models import load_pair

    engine = BiLD(load_pair())
    defaults = BiLDConfig(max_new_tokens=24, sampling=SamplingConfig())
    with Server(create_app(engine, "smollm2-135m-instruct", defaults, queue_size=2)) as server:
        client = server.client()
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        plain = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24)
        assert "Paris" in plain.choices[0].message.content
        stats = plain.model_extra["bild"]["stats"]
        assert stats["small_tokens_kept"] + stats["large_tokens"] == plain.usage.completion_tokens
        chunks = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=24, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == plain.choices[0].message.content
