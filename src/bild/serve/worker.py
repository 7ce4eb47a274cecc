"""One generation at a time per engine, in a worker thread, behind a bounded FIFO queue.

The event loop never runs the model: a request becomes a `Job`, the worker thread runs ``engine.stream`` for it and
hands every piece of final text back to the loop through the job's asyncio queue. Stop strings are applied here, so
streamed and non-streamed answers are cut by the same code. A cancelled job (client gone, server shutting down)
closes its generator at the next chunk, which ends the generation and frees the slot for the next job in line.

A client turned away by a full queue is told when to come back (Retry-After): the queued and running jobs' tokens
still to generate, each job's capped at its max_tokens and at the typical length of recent answers, times the recent
time per token; capped at `MAX_RETRY_AFTER_S`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from bild.config import BiLDConfig, FinishReason, GenerationStats

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 60  # the openai client waits as long as Retry-After says only up to 60 s, then backs off itself
_FIRST_SECONDS_PER_TOKEN = 0.1  # until the first answer is measured: the default pair on a busy 2-core CPU
_RECENT = 0.2  # weight of the newest job in the moving averages


class QueueFull(Exception):
    """Every slot is taken; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the generation queue is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class WorkerClosed(Exception):
    """The server is shutting down and takes no more work."""


@dataclass(frozen=True)
class TextDelta:
    text: str  # final text: checked by the large model and by the stop strings


@dataclass(frozen=True)
class Finished:
    text: str  # the whole answer, cut at the first stop string
    finish_reason: FinishReason
    completion_tokens: int
    stats: GenerationStats | None  # up to the last chunk used (a stop string can end the generation early)


@dataclass(frozen=True)
class Failed:
    error: BaseException


Event = TextDelta | Finished | Failed


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


@dataclass(eq=False)
class Job:
    prompt: str | list[dict]
    chat: bool
    config: BiLDConfig
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    request_id: str = ""  # for the log
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: _State = _State.QUEUED
    tokens_done: int = 0  # generated so far (written by the worker thread)

    def put(self, event: Event) -> None:
        """Hand an event to the request's coroutine (called from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()


class StopScanner:
    """Cut streamed text at the first stop string without ever emitting text that a later chunk would cut.

    Text that could still be the start of a stop string (its last ``len(longest stop) - 1`` characters) is held back
    until the next chunk decides it.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out; no stop string starts before this
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add a chunk; return the text that is now safe to emit. Sets `stopped` when a stop string appeared."""
        self.text += delta
        starts = [start for stop in self.stops if (start := self.text.find(stop, self.emitted)) >= 0]
        if starts:
            self.stopped = True
            self.text = self.text[: min(starts)]
            return self.flush()
        safe = len(self.text) - self.hold
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : safe], safe
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class GenerationWorker:
    """Runs jobs one at a time in FIFO order; at most `queue_size` jobs wait while one runs."""

    def __init__(self, engine, queue_size: int) -> None:
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.engine = engine
        self.queue_size = queue_size
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._in_system = 0  # queued + running
        self._running: Job | None = None
        self._queued: list[Job] = []
        self._closed = False
        self._seconds_per_token = _FIRST_SECONDS_PER_TOKEN  # moving averages of recent jobs, for Retry-After
        self._answer_tokens: float | None = None  # None: no job finished yet
        self._thread = threading.Thread(target=self._run, name="bild-generation", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def depth(self) -> int:
        """Jobs waiting or running."""
        return self._in_system

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._closed:
                raise WorkerClosed("the server is shutting down")
            if self._in_system >= self.queue_size + 1:
                raise QueueFull(self._retry_after_s())
            self._in_system += 1
            self._queued.append(job)
        self._jobs.put(job)

    def _retry_after_s(self) -> int:  # caller holds the lock
        """Seconds until the queued and running work is done, estimated from recent jobs; 1 to MAX_RETRY_AFTER_S."""
        jobs = [*self._queued, *([self._running] if self._running else [])]
        tokens = sum(self._expected_tokens(job) - job.tokens_done for job in jobs)
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(max(tokens, 0) * self._seconds_per_token)))

    def _expected_tokens(self, job: Job) -> float:
        typical = job.config.max_new_tokens if self._answer_tokens is None else self._answer_tokens
        return max(job.tokens_done, min(job.config.max_new_tokens, typical))

    def _learn(self, job: Job, elapsed_s: float) -> None:  # caller holds the lock
        if job.tokens_done == 0:  # cancelled before its first token: says nothing about speed or length
            return
        self._seconds_per_token += _RECENT * (elapsed_s / job.tokens_done - self._seconds_per_token)
        if not job.cancelled.is_set():  # a cancelled answer was cut short: its length is not an answer's
            previous = job.tokens_done if self._answer_tokens is None else self._answer_tokens
            self._answer_tokens = previous + _RECENT * (job.tokens_done - previous)

    def cancel(self, job: Job) -> None:
        """Stop a job: a queued one never starts, a running one stops at its next chunk. Idempotent."""
        job.cancelled.set()
        with self._lock:
            if job.state is _State.QUEUED:
                self._finish(job)

    def stop_accepting(self) -> None:
        """Refuse new jobs (WorkerClosed); the queued and running ones go on."""
        with self._lock:
            self._closed = True

    def cancel_all(self) -> int:
        """Refuse new jobs and end every queued and running one with a WorkerClosed failure; one log line each."""
        with self._lock:
            self._closed = True
            pending = [job for job in [*self._queued, self._running] if job is not None and not job.cancelled.is_set()]
        for job in pending:
            logger.warning("shutting down: cancelled request %s (%s, %d tokens generated)",
                           job.request_id or "?", job.state.value, job.tokens_done)
            self.cancel(job)
            job.put(Failed(WorkerClosed("the server is shutting down")))
        return len(pending)

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every queued and running job (`cancel_all`) and wait for the worker thread."""
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _finish(self, job: Job) -> None:  # caller holds the lock
        if job.state is _State.QUEUED:
            self._queued.remove(job)
        job.state = _State.DONE
        self._in_system -= 1

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            with self._lock:
                if job.state is not _State.QUEUED:  # cancelled while it waited
                    continue
                self._queued.remove(job)
                job.state = _State.RUNNING
                self._running = job
            started = time.perf_counter()
            last: Event | None = None
            try:
                last = self._generate(job)
            except Exception as error:  # noqa: BLE001 -- the request gets the error; the worker keeps serving
                logger.exception("generation failed")
                last = Failed(error)
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self._learn(job, elapsed)
                    self._running = None
                    self._finish(job)
            # The slot is free before the request hears it is answered: a front end that sends the next request as
            # soon as this one is answered (Ray Serve's max_ongoing_requests) never finds the queue still full.
            if last is not None:
                job.put(last)

    def _generate(self, job: Job) -> Finished | None:
        """Hand out the text as it comes; return the closing event (None for a cancelled job, which gets none)."""
        scanner = StopScanner(job.stops)
        completion_tokens = 0
        result = None
        stats = None
        chunks = self.engine.stream(job.prompt, job.config, chat=job.chat)
        try:
            for chunk in chunks:
                if job.cancelled.is_set():
                    return None
                completion_tokens += len(chunk.token_ids)
                job.tokens_done = completion_tokens
                stats = chunk.stats
                if text := scanner.feed(chunk.text):
                    job.put(TextDelta(text))
                if scanner.stopped:
                    break
                if chunk.result is not None:
                    result = chunk.result
        finally:
            chunks.close()  # stops the engine: no token is generated after a stop string or a cancel
        if job.cancelled.is_set():
            return None
        if rest := scanner.flush():  # the held-back tail: no stop string came
            job.put(TextDelta(rest))
        if scanner.stopped or result is None:
            return Finished(scanner.text, "stop", completion_tokens, stats)
        return Finished(scanner.text, result.finish_reason, len(result.token_ids), result.stats)
