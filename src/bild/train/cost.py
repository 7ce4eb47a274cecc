"""Decode cost of a drafter against its large model, measured side by side in one run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from bild.models import LoadedModel


@dataclass(frozen=True)
class DecodeCost:
    """Per-token decode step time of both models, measured interleaved in one run (min over rounds)."""

    large_ms: float
    small_ms: float
    steps: int  # single-token decode steps per round, with a KV cache
    rounds: int

    @property
    def ratio(self) -> float:
        return self.small_ms / self.large_ms


@torch.inference_mode()
def _decode_step_ms(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> float:
    """Mean time of one greedy single-token step after a prefill of ``prompt`` (1, prompt_len)."""
    out = model(input_ids=prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # token: (1, 1)
    started = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - started) * 1000 / steps


def measure_decode_cost(large: LoadedModel, small: LoadedModel, steps: int = 64, rounds: int = 5,
                        prompt_len: int = 64, seed: int = 0) -> DecodeCost:
    """Side-by-side per-token cost: rounds alternate large and small, warm-up excluded, min over rounds."""
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, large.model.config.vocab_size, (1, prompt_len), generator=generator)
    _decode_step_ms(large.model, prompt, 4), _decode_step_ms(small.model, prompt, 4)  # warm-up
    large_times, small_times = [], []
    for _ in range(rounds):
        large_times.append(_decode_step_ms(large.model, prompt, steps))
        small_times.append(_decode_step_ms(small.model, prompt, steps))
    return DecodeCost(min(large_times), min(small_times), steps, rounds)
