"""One generation at a time per engine, in a worker thread, behind a bounded FIFO queue.

The event loop never runs the model: a request becomes a `Job`, the worker thread runs ``engine.stream`` for it and
hands every piece of final text back to the loop through the job's asyncio queue. Stop strings are applied here, so
streamed and non-streamed answers are cut by the same code. A cancelled job (client gone, server shutting down)
closes its generator at the next chunk, which ends the generation and frees the slot for the next job in line.
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
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: _State = _State.QUEUED

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
        self._mean_job_s = 1.0  # moving average of job durations, for Retry-After
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
                raise QueueFull(max(1, math.ceil(self._mean_job_s * self._in_system)))
            self._in_system += 1
            self._queued.append(job)
        self._jobs.put(job)

    def cancel(self, job: Job) -> None:
        """Stop a job: a queued one never starts, a running one stops at its next chunk. Idempotent."""
        job.cancelled.set()
        with self._lock:
            if job.state is _State.QUEUED:
                self._finish(job)

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new jobs, cancel every queued and running one, and wait for the worker thread."""
        with self._lock:
            self._closed = True
            pending = [*self._queued, *([self._running] if self._running else [])]
        for job in pending:
            self.cancel(job)
            job.put(Failed(WorkerClosed("the server is shutting down")))
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
            try:
                self._generate(job)
            except Exception as error:  # noqa: BLE001 -- the request gets the error; the worker keeps serving
                logger.exception("generation failed")
                job.put(Failed(error))
            finally:
                elapsed = time.perf_counter() - started
                with self._lock:
                    self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * elapsed
                    self._running = None
                    self._finish(job)

    def _generate(self, job: Job) -> None:
        scanner = StopScanner(job.stops)
        completion_tokens = 0
        result = None
        stats = None
        chunks = self.engine.stream(job.prompt, job.config, chat=job.chat)
        try:
            for chunk in chunks:
                if job.cancelled.is_set():
                    return
                completion_tokens += len(chunk.token_ids)
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
            return
        if rest := scanner.flush():  # the held-back tail: no stop string came
            job.put(TextDelta(rest))
        if scanner.stopped or result is None:
            job.put(Finished(scanner.text, "stop", completion_tokens, stats))
        else:
            job.put(Finished(scanner.text, result.finish_reason, len(result.token_ids), result.stats))
