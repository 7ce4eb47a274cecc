"""Prometheus metrics of one server, in a registry of its own (two apps in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bild.config import GenerationStats

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bild_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.generated_tokens = Counter("bild_generated_tokens", "tokens in the answers sent", registry=r)
        self.large_passes = Counter("bild_large_passes", "non-autoregressive large-model passes", registry=r)
        self.fallbacks = Counter("bild_fallbacks", "large passes triggered by low small-model confidence", registry=r)
        self.rollbacks = Counter("bild_rollbacks", "small-model tokens replaced by the large model", registry=r)
        self.small_tokens_kept = Counter("bild_small_tokens_kept", "output tokens written by the small model", registry=r)
        self.large_tokens = Counter("bild_large_tokens", "output tokens written by the large model", registry=r)
        self.lookup_tokens_kept = Counter("bild_lookup_tokens_kept", "large-model output tokens that lookup drafted",
                                          registry=r)
        self.latency = Histogram(
            "bild_request_latency_seconds", "time from request to the last byte of the answer", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "bild_time_to_first_token_seconds", "time from request to the first text sent (queueing included)",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("bild_queue_depth", "generation requests waiting or running", registry=r)

    def record_generation(self, completion_tokens: int, stats: GenerationStats | None) -> None:
        self.generated_tokens.inc(completion_tokens)
        if stats is None:
            return
        self.large_passes.inc(stats.large_passes)
        self.fallbacks.inc(stats.fallbacks)
        self.rollbacks.inc(stats.rollbacks)
        self.small_tokens_kept.inc(stats.small_tokens_kept)
        self.large_tokens.inc(stats.large_tokens)
        self.lookup_tokens_kept.inc(stats.lookup_tokens_kept)

    def render(self) -> bytes:
        return generate_latest(self.registry)
