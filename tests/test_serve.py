"""`bild serve` end to end: a real uvicorn server on 127.0.0.1 in a thread, tiny seeded models, the official client."""

from __future__ import annotations

import asyncio
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
import types
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
from bild.serve import DrainingServer, create_app
from bild.serve.worker import MAX_RETRY_AFTER_S, Finished, GenerationWorker, Job, QueueFull, StopScanner
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
    """uvicorn in a thread on a free loopback port: bild's DrainingServer, or plain uvicorn with `plain=True`.

    uvicorn's loggers propagate to the root logger (log_config=None), so caplog sees what the server logs."""

    def __init__(self, app, shutdown_timeout_s: float = 3.0, plain: bool = False) -> None:
        self.app = app
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        options = {"log_level": "warning", "log_config": None}
        if plain:
            self.server = uvicorn.Server(uvicorn.Config(app, timeout_graceful_shutdown=shutdown_timeout_s, **options))
        else:
            self.server = DrainingServer(app, shutdown_timeout_s, **options)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.thread.join(10)
        self.socket.close()

    def stop(self) -> None:
        """What SIGTERM does: uvicorn's main loop sees should_exit and shuts down."""
        self.server.should_exit = True

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
    extra = {"fallback_threshold": 0.9, "rollback_threshold": 0.0, "max_small_steps": 3, "repeat_ngram": 4, "lookup": 1}
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
        "bild_rollbacks_total", "bild_small_tokens_kept_total", "bild_lookup_tokens_kept_total",
        "bild_request_latency_seconds_bucket",
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
    "lookup": st.integers(-3, 2000) | _JSON,
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


# ---- the hostile audit: limits, compatibility, messages --------------------------------------------------------


def test_chunked_body_over_the_limit_is_413_as_it_arrives(fuzz_server):
    """No Content-Length: the body is counted as it arrives and refused once past 8 MiB, not read and tokenized whole."""
    sent = 0

    def body():
        nonlocal sent
        head = json.dumps({"model": MODEL, "prompt": ""})[:-2].encode()  # '{"model": "tiny", "prompt": '
        yield head + b'"'
        for _ in range(64 * 16):  # 64 MiB of prompt in 64 KiB pieces, if the server read it all
            sent += 2**16
            yield b"w5 " * (2**16 // 3) + b"w"
        yield b'"}'

    started = time.monotonic()
    response = fuzz_server.post("/v1/completions", content=body(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["message"] == "the request body is larger than 8 MiB"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert sent < 24 * 2**20, f"the server read {sent / 2**20:.0f} MiB before answering"
    assert time.monotonic() - started < 20
    assert fuzz_server.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}).status_code == 200


class CountingTokenizer:
    """The engine's tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_prompt_limit_is_the_operators_and_a_huge_prompt_is_not_tokenized_whole(engine):
    slow = SlowEngine(engine, delay_s=0)
    slow.tokenizer = CountingTokenizer(engine.tokenizer)
    with Server(create_app(slow, MODEL, DEFAULTS, max_prompt_tokens=8)) as server:
        client = server.client()
        assert client.completions.create(model=MODEL, prompt="w5 w6 w7", max_tokens=2).choices
        for create, prompt in [
            (client.completions.create, {"prompt": "w5 " * 20}),
            (client.chat.completions.create, {"messages": [{"role": "user", "content": "w5 " * 20}]}),
        ]:
            with pytest.raises(openai.BadRequestError) as bad:
                create(model=MODEL, max_tokens=2, **prompt)
            assert bad.value.code == "context_length_exceeded"
            assert "this server takes prompts of at most 8 tokens (bild serve --max-prompt-tokens)" in bad.value.message
        slow.tokenizer.longest = 0
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model=MODEL, prompt="w5 " * 1_000_000, max_tokens=2)  # 3 MB
        assert "is more than 8 tokens" in bad.value.message and bad.value.code == "context_length_exceeded"
        assert slow.tokenizer.longest <= 9 * 16, "the whole prompt was tokenized"


def test_a_prompt_over_the_context_is_context_length_exceeded_on_every_route(server, client):
    long = " ".join(["w5"] * 600)  # the tiny models' context is 512 tokens
    calls = [
        lambda: client.completions.create(model=MODEL, prompt=long),
        lambda: client.completions.create(model=MODEL, prompt=long, stream=True),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}]),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}], stream=True),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as bad:
            call()
        assert bad.value.code == "context_length_exceeded" and "this model's context is 512 tokens" in bad.value.message


def test_no_op_values_of_unsupported_openai_fields_are_accepted(client):
    messages = [{"role": "user", "content": PROMPT}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    defaults = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, logprobs=False, top_logprobs=0, presence_penalty=0,
        frequency_penalty=0.0,
    )
    assert defaults.choices[0].message.content == plain.choices[0].message.content
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, presence_penalty=0).choices
    for field, value, allowed in [("logprobs", True, "false"), ("presence_penalty", 0.5, "0"), ("top_logprobs", 3, "0")]:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **{field: value})
        assert bad.value.param == field
        assert f"field '{field}': bild does not support {field}; send {allowed} or leave it out" in bad.value.message


def test_bearer_scheme_is_case_insensitive(engine):
    with Server(create_app(engine, MODEL, DEFAULTS, api_key="s3cret")) as server:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        for header in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"]:
            assert httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": header}).status_code == 200
        for header in ["Basic s3cret", "Bearer s3cre", "s3cret", "Bearers3cret"]:
            assert httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": header}).status_code == 401


@pytest.mark.parametrize(
    "raw, headers, param, message",
    [
        ('{"model": "tiny", "prompt": "w5", "temperature": NaN}', {"Content-Type": "application/json"}, "temperature",
         "field 'temperature': NaN is not a number: send a number"),
        ('{"model": "tiny", "prompt": "w5", "max_tokens": NaN}', {"Content-Type": "application/json"}, "max_tokens",
         "NaN is not a number"),
        ('{"model": "tiny", "prompt": "w5"}', {}, None,
         "the request body must be JSON sent with 'Content-Type: application/json'; this request has no Content-Type header"),
        ('{"model": "tiny", "prompt": "w5"}', {"Content-Type": "application/x-www-form-urlencoded"}, None,
         "this request has 'Content-Type: application/x-www-form-urlencoded'"),
        ('["w5"]', {"Content-Type": "application/json"}, None, "the request body must be a JSON object"),
        ('{"model": "tiny", "prompt": "w5 \\ud800 w6"}', {"Content-Type": "application/json"}, "prompt",
         "field 'prompt': contains a lone UTF-16 surrogate (\\ud800 at character 3), which is not valid Unicode"),
        ('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
         {"Content-Type": "application/json"}, "messages[0].content[0].text", "lone UTF-16 surrogate (\\udfff"),
    ],
)
def test_bad_values_get_messages_that_say_what_is_wrong(fuzz_server, raw, headers, param, message):
    path = "/v1/chat/completions" if "messages" in raw else "/v1/completions"
    error = fuzz_server.post(path, content=raw, headers=headers).json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert "TextEncodeInput" not in error["message"] and "Value error" not in error["message"]


class HeldEngine:
    """Chunks of one token; a job whose prompt is 'hold' waits for `release` before its first chunk."""

    def __init__(self, seconds_per_token: float = 0.0) -> None:
        self.release = threading.Event()
        self.seconds_per_token = seconds_per_token

    def stream(self, prompt, config, chat=None):
        if prompt == "hold":
            self.release.wait(10)
        for _ in range(config.max_new_tokens):
            time.sleep(self.seconds_per_token)
            yield types.SimpleNamespace(token_ids=[7], text="w7 ", stats=None, result=None)


def _job(prompt: str, max_new_tokens: int, loop) -> Job:
    return Job(prompt=prompt, chat=False, config=config(max_new_tokens=max_new_tokens), stops=[], loop=loop)


def test_retry_after_is_the_queued_work_not_the_last_long_job():
    """After one long answer (300 tokens), a queue of short requests (2 tokens) is due in about a second: Retry-After
    comes from the queued tokens times the recent time per token (was: mean job length x depth, 165 s for 8 s)."""
    loop = asyncio.new_event_loop()
    engine = HeldEngine(seconds_per_token=0.002)
    worker = GenerationWorker(engine, queue_size=8)
    try:
        worker.submit(_job("long", 300, loop))
        assert _wait_until(lambda: worker.depth == 0, timeout_s=10)
        worker.submit(_job("hold", 2, loop))
        for _ in range(8):
            worker.submit(_job("short", 2, loop))
        with pytest.raises(QueueFull) as full:
            worker.submit(_job("short", 2, loop))
        assert full.value.retry_after_s <= 2  # 18 tokens x ~0.08 s/token (mostly the first guess); was 9
    finally:
        engine.release.set()
        worker.close()
        loop.close()


def test_an_answered_request_has_already_freed_its_slot(monkeypatch):
    """A front end that sends the next request the moment one is answered (Ray Serve holds each replica to
    queue_size + 1) must find a free slot: the worker frees it before the closing event (was: a 429 when the worker
    thread was descheduled between the answer and its bookkeeping, as on a loaded machine)."""
    loop = asyncio.new_event_loop()
    worker = GenerationWorker(HeldEngine(), queue_size=0)
    generate = worker._generate

    def generate_then_lag(job):  # the worker thread is descheduled right after a generation
        last = generate(job)
        time.sleep(0.3)
        return last

    monkeypatch.setattr(worker, "_generate", generate_then_lag)

    async def answer(prompt: str) -> Finished:
        job = _job(prompt, 2, loop)
        worker.submit(job)
        while not isinstance(event := await job.events.get(), Finished):
            pass
        return event

    async def back_to_back() -> list[Finished]:
        return [await answer(prompt) for prompt in ("first", "second", "third")]

    try:
        answers = loop.run_until_complete(asyncio.wait_for(back_to_back(), timeout=10))
        assert [event.completion_tokens for event in answers] == [2, 2, 2]
    finally:
        worker.close()
        loop.close()


def test_retry_after_is_capped():
    loop = asyncio.new_event_loop()
    engine = HeldEngine()
    worker = GenerationWorker(engine, queue_size=2)
    try:
        for prompt in ["hold", "long", "long"]:
            worker.submit(_job(prompt, 100_000, loop))
        with pytest.raises(QueueFull) as full:
            worker.submit(_job("short", 2, loop))
        assert full.value.retry_after_s == MAX_RETRY_AFTER_S
    finally:
        worker.cancel_all()  # the held job stops at its first chunk
        engine.release.set()
        worker.close()
        loop.close()


def test_the_default_queue_takes_a_burst_of_24_short_requests(engine):
    """24 concurrent short requests against the default queue: all answered, none turned away (was 15 x 429)."""
    slow = SlowEngine(engine, delay_s=0.002)
    with Server(create_app(slow, MODEL, DEFAULTS)) as server:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4}
        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(lambda _: httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code, range(24)))
        assert statuses == [200] * 24


def test_cli_defaults_are_the_servers():
    from bild.cli import serve as cli_serve
    from bild.serve import app

    assert cli_serve.DEFAULT_QUEUE_SIZE == app.DEFAULT_QUEUE_SIZE
    assert cli_serve.DEFAULT_MAX_PROMPT_TOKENS == app.DEFAULT_MAX_PROMPT_TOKENS


# ---- shutdown ----------------------------------------------------------------------------------------------------


def _stream_events(url: str, body: dict, started: threading.Event) -> list[str]:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        events = []
        for line in response.iter_lines():
            if line:
                events.append(line.removeprefix("data: "))
                started.set()
        return events


@pytest.mark.parametrize("plain", [False, True], ids=["bild-runner", "plain-uvicorn"])
def test_shutdown_ends_every_request_in_band(engine, plain, caplog):
    """Shutdown past the timeout: a stream ends with an error event and [DONE], a running and a queued non-streamed
    request get 503 with Retry-After, one log line per request and no traceback. bild's runner ends them itself;
    under plain uvicorn, whose timeout cancels the request tasks, the app still ends them properly."""
    slow = SlowEngine(engine, delay_s=0.3)  # PROMPT's answer is 15 chunks: 4.5 s, well past the 0.5 s timeout
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400}
    with Server(create_app(slow, MODEL, DEFAULTS, queue_size=4), shutdown_timeout_s=0.5, plain=plain) as server:
        with ThreadPoolExecutor(3) as pool:
            streaming = threading.Event()
            stream = pool.submit(_stream_events, server.url, body | {"stream": True}, streaming)
            assert streaming.wait(20)
            waiting = [pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=30) for _ in range(2)]
            assert _wait_until(lambda: httpx.get(server.url + "/health").json()["queue_depth"] == 3)
            server.stop()
            events = stream.result(timeout=20)
            answers = [future.result(timeout=20) for future in waiting]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert len(events) < 15
    for answer in answers:
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "shutting_down"
        assert int(answer.headers["Retry-After"]) >= 1
    cancelled = [record for record in caplog.records if "cancelled request" in record.getMessage()]
    assert len(cancelled) == 3, [record.getMessage() for record in caplog.records]
    assert not [record for record in caplog.records if record.exc_info], "a traceback was logged"


# ---- the command line and SIGTERM ------------------------------------------------------------------------------


def test_cli_rejects_bad_settings_before_loading_models(capsys):
    from bild.cli import main

    assert main(["serve", "--rollback-threshold", "-1"]) == 2
    assert "rollback_threshold" in capsys.readouterr().err
    assert main(["serve", "--queue-size", "-1"]) == 2
    assert main(["serve", "--small", "none"]) == 2
    assert "needs a small model" in capsys.readouterr().err


_SIGTERM_SCRIPT = """
import logging, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")  # as `bild serve` does
from test_serve import SlowEngine, tiny_chat_engine, DEFAULTS
from bild.serve import create_app, run
app = create_app(SlowEngine(tiny_chat_engine(), 0.5), "tiny", DEFAULTS, queue_size=2)
run(app, "127.0.0.1", {port}, shutdown_timeout_s=1, log_level="warning")
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
        # cut off by the shutdown timeout, the stream still ends with an error event and [DONE], not mid-body
        events = [line.removeprefix("data: ") for line in rest if line]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "shutting_down"
        log = process.stderr.read()
        assert "Traceback" not in log
        assert len([line for line in log.splitlines() if "cancelled request" in line]) == 1, log
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
