"""bild's OpenAI-compatible app as a Ray Serve deployment: one engine per replica, Ray routes and scales.

Each replica loads the pair once and serves the same app as `bild serve` (``create_app``): completions, chat,
streaming, models, health, metrics, the per-request BiLD fields and statistics, the API key and the same 4xx errors.
Every response names the replica that served it (header ``X-Bild-Replica``; ``/health`` and ``/metrics`` too).

Overload is answered with 429 and Retry-After, never a 5xx: Ray sends a replica at most what it can hold (one request
generating, ``queue_size`` waiting), holds the rest in its own queue in front of the replicas, and refuses what does
not fit there (``max_queued_requests``).

Put bild in your own Serve application::

    from ray import serve
    from bild.serve.ray import ReplicaSpec, build_app

    serve.run(build_app(ReplicaSpec(large="smollm2-135m-instruct", small="smollm2-little-int8"), replicas=2))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from bild.config import BiLDConfig, DraftCosts
from bild.extras import require
from bild.serve.app import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_QUEUE_SIZE

require("ray", "bild's Ray Serve deployment")

from ray import serve  # noqa: E402  (after the extra check)
from ray.serve.config import AutoscalingConfig, BackpressureConfig  # noqa: E402

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Bild-Replica"
DEPLOYMENT_NAME = "bild"


@dataclass(frozen=True)
class ReplicaSpec:
    """What a replica needs to build its engine and app; sent to every replica, so plain picklable values only."""

    large: str
    small: str
    model_name: str | None = None  # what clients send as `model` (default: the large model's name)
    defaults: BiLDConfig = field(default_factory=BiLDConfig)
    queue_size: int = DEFAULT_QUEUE_SIZE  # requests that wait inside one replica while it generates
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    api_key: str | None = None
    threads: int | None = None  # torch CPU threads per replica (None: torch's choice)
    costs: DraftCosts | None = None  # fixed costs for the adaptive policy (None: each replica measures its own)


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and what each one reserves from the cluster."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: a fixed `replicas`
    target_ongoing: float = 2.0  # autoscaling target of ongoing requests per replica
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    # requests Ray holds in front of busy replicas before it answers 429; a burst counts in full until Ray has handed
    # its requests to replicas, so this must cover the largest burst, not only what the replicas leave over
    max_queued: int = 64
    retry_after_s: float = 5.0  # the Retry-After of Ray's 429

    def __post_init__(self) -> None:
        if self.autoscale is None and self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise ValueError(f"autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {low}:{high}")
        if self.target_ongoing <= 0:
            raise ValueError(f"the autoscaling target must be > 0, got {self.target_ongoing}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus} and {self.num_gpus}")
        if self.max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {self.max_queued}")


def build_app(spec: ReplicaSpec, scaling: Scaling = Scaling()) -> serve.Application:
    """The bild deployment, bound and ready for ``serve.run`` (or a Serve config's import path)."""
    options = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": scaling.num_cpus, "num_gpus": scaling.num_gpus},
        # One request generates while `queue_size` wait inside the replica: Ray sends no more than that, so the
        # rest wait in Ray's queue (and reach whichever replica frees first) instead of being refused by a full one.
        "max_ongoing_requests": spec.queue_size + 1,
        "max_queued_requests": scaling.max_queued,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=scaling.retry_after_s),
    }
    if scaling.autoscale is None:
        options["num_replicas"] = scaling.replicas
    else:
        low, high = scaling.autoscale
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=low, max_replicas=high, initial_replicas=max(low, 1), target_ongoing_requests=scaling.target_ongoing
        )

    def make_app():  # a plain function: Ray Serve calls builders (not partials) on each replica when it starts
        return replica_app(spec)

    ingress = serve.ingress(make_app)(_BildReplica)
    return serve.deployment(ingress, **options).bind()


class _BildReplica:
    """The deployment's class: all its routes come from the ASGI app that `replica_app` builds on the replica."""


def replica_app(spec: ReplicaSpec):
    """Runs on a replica when it starts: load the pair, build the app, name the replica in every answer."""
    import torch

    from bild.decoding import BiLD
    from bild.models import load_pair
    from bild.serve.app import create_app

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    replica = _replica_name()
    engine = BiLD(load_pair(spec.large, spec.small), costs=spec.costs)
    app = create_app(engine, spec.model_name or spec.large, spec.defaults, queue_size=spec.queue_size, api_key=spec.api_key,
                     max_prompt_tokens=spec.max_prompt_tokens, replica=replica)
    app.add_middleware(_ReplicaHeader, replica=replica)
    logger.info("replica %s serves %s + %s", replica, spec.large, spec.small)
    return app


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RuntimeError:  # built outside a replica (a test, a plain uvicorn)
        return "local"


class _ReplicaHeader:
    """Adds ``X-Bild-Replica: <id>`` to every response (plain ASGI: streaming passes through untouched)."""

    def __init__(self, app, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.lower().encode(), replica.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)

